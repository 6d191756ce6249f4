"""`--tensorboard`: the metrics train() logs (handed in as a metrics sink), also written as TensorBoard event files in the run directory
(beside metrics.jsonl), for watching a run live with `tensorboard --logdir runs`."""

from __future__ import annotations

import weakref
from typing import Callable

from ..config import TrainConfig
from ..errors import PicoError

# metrics.jsonl key -> TensorBoard tag
TAGS = {"train_loss": "loss/train", "test_loss": "loss/test", "bits_per_byte": "bits_per_byte/test", "lr": "lr",
        "tokens_per_s": "tokens_per_s"}


def require_tensorboard():
    """torch's SummaryWriter, or a one-line PicoError naming the optional extra."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise PicoError("--tensorboard needs the tensorboard package: pip install -e '.[tensorboard]'") from None
    return SummaryWriter


class TensorBoardLog:
    """Checks for tensorboard at once; opens its writer on the first records, so that nothing is written
    before the run directory is ready. A resumed run's first record sets purge_step: events logged after
    the checkpoint by the interrupted process are hidden, as the run's metrics.jsonl drops them."""

    def __init__(self, run_dir: str):
        self._writer_cls = require_tensorboard()
        self.run_dir = run_dir
        self.writer = None

    def write(self, records: list[dict]) -> None:
        if not records:
            return
        if self.writer is None:
            self.writer = self._writer_cls(log_dir=self.run_dir, purge_step=records[0]["step"])
            weakref.finalize(self, self.writer.close)
        for r in records:
            for key, tag in TAGS.items():
                if r.get(key) is not None:
                    self.writer.add_scalar(tag, r[key], global_step=r["step"])
        self.writer.flush()



def tensorboard_sinks(train_cfg: TrainConfig) -> Callable[[str], tuple]:
    """For train(sinks=...): run directory -> (a TensorBoardLog's writer,) when the run asks for
    TensorBoard, else (). Checks for tensorboard at once."""
    if not train_cfg.tensorboard:
        return lambda run_dir: ()
    require_tensorboard()
    return lambda run_dir: (TensorBoardLog(run_dir).write,)
