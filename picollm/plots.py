"""The one module that imports matplotlib (headless backend)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def loss_curves(runs: dict[str, list[dict]], path: str, title: str = "loss") -> None:
    """Train loss per step (thin) and test loss per evaluation (markers) of one or several runs."""
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, records) in enumerate(runs.items()):
        c = colors[i % len(colors)]
        s, v = _series(records, "train_loss")
        if s:
            ax.plot(s, v, color=c, alpha=0.45, lw=1, label=f"{name} train")
        s, v = _series(records, "test_loss")
        if s:
            ax.plot(s, v, color=c, marker="o", ms=4, lw=2, label=f"{name} test")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
