"""`pico-llm compare RUN...`: overlaid loss curves and a table of several runs (finished or not), with
each run's early-stopping point (the evaluation of lowest test loss) and an overfitting flag.

A run is flagged as overfitting when its test loss rises at `patience` (default 3) or more consecutive
evaluations while its train loss falls over the same span (train loss at an evaluation: the mean of the
train losses logged since the evaluation before). A directory that is not a run stands for every run at
any depth under it (a sweep, a multi-model run, a folder of those).
"""

from __future__ import annotations

import math
import os
from typing import Callable, Optional

from .. import checkpoint as ckpt
from ..errors import PicoError
from ..plots import loss_panels
from .sweep import read_sweep

COMPARE_MD, COMPARE_PNG = "compare.md", "compare.png"


def _evaluations(records: list[dict]) -> list[tuple[int, float, Optional[float]]]:
    """(step, test loss, mean train loss since the evaluation before) per evaluation."""
    out, prev, window = [], 0, []
    train = [(r["step"], r["train_loss"]) for r in records if r.get("train_loss") is not None]
    i = 0
    for r in records:
        if r.get("test_loss") is None:
            continue
        window = []
        while i < len(train) and train[i][0] <= r["step"]:
            if train[i][0] > prev:
                window.append(train[i][1])
            i += 1
        out.append((r["step"], r["test_loss"], sum(window) / len(window) if window else None))
        prev = r["step"]
    return out


def overfitting_span(records: list[dict], patience: int = 3) -> Optional[dict]:
    """The first span of >= `patience` consecutive rises of the test loss over which the train loss falls:
    {"from_step", "to_step", "rises", "test_rise", "train_fall"}; None when there is none."""
    ev = _evaluations(records)
    s = 0
    while s < len(ev) - 1:
        e = s
        while e + 1 < len(ev) and ev[e + 1][1] > ev[e][1]:
            e += 1
        if e - s >= patience and ev[s][2] is not None and ev[e][2] is not None and ev[e][2] < ev[s][2]:
            return {"from_step": ev[s][0], "to_step": ev[e][0], "rises": e - s, "test_rise": ev[e][1] - ev[s][1],
                    "train_fall": ev[s][2] - ev[e][2]}
        s = max(e, s + 1)
    return None


def run_stats(records: list[dict], patience: int = 3) -> dict:
    """Final train loss (mean of the last 10 logged steps, as summary.json), final and best test loss, the
    best step, the train/test gap at the first and the last evaluation, and the overfitting span."""
    train = [r["train_loss"] for r in records if r.get("train_loss") is not None]
    ev = _evaluations(records)
    out = {"steps": max((r["step"] for r in records), default=0),
           "train_loss": sum(train[-10:]) / len(train[-10:]) if train else None,
           "test_loss": ev[-1][1] if ev else None, "best_test_loss": None, "best_step": None,
           "first_gap": None, "gap": None, "evaluations": len(ev)}
    finite = [e for e in ev if math.isfinite(e[1])]  # a diverged evaluation (NaN, inf) is never the best
    if finite:
        best = min(finite, key=lambda e: e[1])
        out.update(best_test_loss=best[1], best_step=best[0])
    if ev:
        if ev[0][2] is not None:
            out["first_gap"] = ev[0][1] - ev[0][2]
        if out["train_loss"] is not None:
            out["gap"] = ev[-1][1] - out["train_loss"]
    out["overfitting"] = overfitting_span(records, patience)
    return out


def _has_metrics(run: str) -> bool:
    p = os.path.join(run, ckpt.METRICS)
    return os.path.isfile(p) and os.path.getsize(p) > 0


def _sweep_order(root: str, runs: list[str]) -> list[str]:
    """runs under root in the order of root's sweep.json points when it is a sweep (others after)."""
    meta = read_sweep(root)
    if not meta:
        return runs
    rank = {q["run"]: i for i, q in enumerate(meta["points"])}
    return sorted(runs, key=lambda r: rank.get(os.path.relpath(r, root).split(os.sep)[0], len(rank)))


def find_runs(paths: list[str]) -> tuple[list[str], list[str]]:
    """(runs, notes) from the arguments: a run stands for itself, any other directory for every run at any
    depth under it (in its sweep.json's order when it is a sweep, else sorted). Notes say what was left
    out (a run with no metrics yet) and which runs are unfinished (no summary.json: figures so far)."""
    out, notes = [], []
    for p in paths:
        if not os.path.exists(p):
            raise PicoError(f"{p} does not exist")
        if not os.path.isdir(p):
            raise PicoError(f"{p} is not a run directory")
        if os.path.isfile(os.path.join(p, ckpt.CONFIG)):
            out.append(p)
            continue
        found = _sweep_order(p, ckpt.runs_under(p, loadable=False))
        inner = [r for r in found if _has_metrics(r)]
        notes += [f"left out {r}: no metrics yet (not started)" for r in found if r not in inner]
        if not inner:
            raise PicoError(f"{p} is not a run directory (no {ckpt.CONFIG}) and holds no runs"
                            + (f" with metrics yet ({len(found)} not started)" if found else ""))
        out.extend(inner)
    if len(set(map(os.path.abspath, out))) != len(out):
        raise PicoError("a run is given twice")
    unfinished = [r for r in out if not os.path.isfile(os.path.join(r, ckpt.SUMMARY))]
    if unfinished:
        notes.append(f"{len(unfinished)} of {len(out)} runs unfinished (no {ckpt.SUMMARY}), figures so far: "
                     + ckpt.listing(unfinished, 200))
    return out, notes


def resolve_runs(paths: list[str], log: Callable[[str], None] = print) -> list[str]:
    """find_runs' runs; its notes go to `log`."""
    runs, notes = find_runs(paths)
    for n in notes:
        log(n)
    return runs


def run_labels(runs: list[str]) -> list[str]:
    """Short unique names: the directory names, or paths below the common parent when those repeat."""
    names = [os.path.basename(os.path.normpath(r)) for r in runs]
    if len(set(names)) == len(names):
        return names
    common = os.path.commonpath([os.path.abspath(r) for r in runs])
    return [os.path.relpath(os.path.abspath(r), common) for r in runs]


def _f(v, fmt="{:.4f}") -> str:
    if v is None:
        return ""
    return fmt.format(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def compare_table(labels: list[str], stats: list[dict], summaries: list[dict]) -> str:
    extra = [("bits_per_byte", "bits/byte", "{:.3f}"), ("continuation_accuracy", "cont. acc.", "{:.3f}")]
    extra = [e for e in extra if any(s.get(e[0]) is not None for s in summaries)]
    head = ["run", "steps", "train loss", "test loss", "gap (test - train)", "best test loss", "best step",
            *(e[1] for e in extra), "overfitting"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 2) + "---|"]
    for label, st, su in zip(labels, stats, summaries):
        o = st["overfitting"]
        flag = f"yes: test loss up {o['rises']} evals, steps {o['from_step']}-{o['to_step']}" if o else "no"
        cells = [label.replace("|", "\\|"), str(st["steps"]), _f(st["train_loss"]), _f(st["test_loss"]),
                 _f(st["gap"], "{:+.4f}"), _f(st["best_test_loss"]), _f(st["best_step"], "{}"),
                 *(_f(su.get(k), fmt) for k, _, fmt in extra), flag]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compare_runs(paths: list[str], out: Optional[str] = None, patience: int = 3,
                 log: Callable[[str], None] = print) -> dict:
    """Table and overlaid loss curves of several runs; writes OUT/compare.md and OUT/compare.png (OUT: the
    runs' common parent directory unless given). Returns {"table", "runs": {label: stats}, "md", "png"}."""
    if patience < 1:
        raise PicoError("--patience must be >= 1")
    runs = resolve_runs(paths, log)
    labels = run_labels(runs)
    records = {}
    for label, r in zip(labels, runs):
        records[label] = ckpt.read_metrics(r)
        if not records[label]:
            raise PicoError(f"{r} has no metrics yet ({ckpt.METRICS} is missing or empty)")
    stats = [run_stats(records[label], patience) for label in labels]
    summaries = [ckpt.read_summary(r) if os.path.isfile(os.path.join(r, ckpt.SUMMARY)) else {} for r in runs]
    table = compare_table(labels, stats, summaries)
    if out is None:
        out = os.path.commonpath([os.path.dirname(os.path.abspath(r)) for r in runs])
    if os.path.exists(out) and not os.path.isdir(out):
        raise PicoError(f"--out {out} is not a directory")
    os.makedirs(out, exist_ok=True)
    md, png = os.path.join(out, COMPARE_MD), os.path.join(out, COMPARE_PNG)
    notes = []
    for label, st in zip(labels, stats):
        o = st["overfitting"]
        if o:
            notes.append(f"- **{label}** overfits: test loss rose at {o['rises']} consecutive evaluations "
                         f"(steps {o['from_step']}-{o['to_step']}, +{o['test_rise']:.4f}) while train loss fell "
                         f"by {o['train_fall']:.4f}; stop early at step {st['best_step']}.")
    body = table + ("\n" + "\n".join(notes) + "\n" if notes else "")
    ckpt.write_text(md, "# Comparison\n\n" + body)
    with ckpt.atomic_path(png) as tmp:
        loss_panels(records, tmp, title="train and test loss")
    log(body)
    log(f"wrote {md} and {png}")
    return {"table": table, "runs": dict(zip(labels, stats)), "md": md, "png": png}
