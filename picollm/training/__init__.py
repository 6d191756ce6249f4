"""Training, one concern a module: loop.py (TrainState, train_step, train), optim.py (AdamW and the
learning-rate schedule), distributed.py (torchrun / DDP), summary.py (end-of-run figures, samples,
tables), runs.py (several models side by side), compile.py (torch.compile with a fallback)."""

from .loop import Stepper, TrainState, train, train_step
from .runs import train_models

__all__ = ["Stepper", "TrainState", "train", "train_models", "train_step"]
