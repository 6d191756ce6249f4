"""`pico-llm sweep SPEC.toml`: train one run per point of a grid or list over train flags, in sequence,
resumably, then tabulate and plot the results.

A spec is a TOML file whose keys are `pico-llm train` flags without the leading dashes:

    name = "pos_emb"          # optional: the sweep's directory under --output_dir (default: the file's stem)
    description = "..."       # optional: one line, shown in the report
    x = "pos_emb"             # optional: the swept flag on the x axis of the metric plot (default: the first
                              #   when every point sets it, else "run": the points by name)

    [base]                    # flags every point gets
    dataset = "numbers"
    numbers_count = 3000
    models = "transformer"
    epochs = 6

    [grid]                    # every combination of these lists is a point (cartesian product) ...
    pos_emb = ["none", "learned", "sinusoidal", "rope"]

    [[points]]                # ... and/or an explicit list of points; with both, each point is combined
    n_blocks = 1              #     with every grid combination
    n_heads = 2

Values are TOML strings, numbers and booleans. A switch (`use_post_norm`, `tensorboard`) is set by `true`;
flags of several values (`input_files`) take a list (a list of lists in [grid]). An empty [[points]] table
is the [base] settings themselves (a point named `base`: a reference to compare with). Paths are relative
to the current directory, as on the command line. Each point trains exactly one model (sweep `models` in
[grid] to compare families). `output_dir`, `run_name`, `resume`, `overwrite` and `stop_at_step` belong to
the sweep itself and may not appear in a spec. `pico-llm sweep SPEC --set KEY=VALUE` overrides (or adds) a
[base] flag, e.g. `--set max_steps_per_epoch=500`; the value is read as TOML when it parses, else as text.

Every point is built exactly as `pico-llm train FLAGS` builds a run (the same parser, validation and
`train_models`), so every train flag works and a bad one is reported before anything runs. Layout:

    OUTPUT_DIR/NAME/sweep.json             the resolved spec: base flags, swept keys, points and their runs
    OUTPUT_DIR/NAME/<key=value,...>/       one run directory per point (named from its swept values)
    OUTPUT_DIR/NAME/results.csv, results.md
    OUTPUT_DIR/NAME/losses.png             train and test loss of every point, overlaid
    OUTPUT_DIR/NAME/metrics_vs_<x>.png     final / best test loss (and continuation accuracy) against x

Running the same command again skips finished points (summary.json present), resumes an interrupted one
from its last checkpoint and trains the rest. A point whose directory holds a run trained with other
settings is an error (use another --output_dir, or --overwrite to retrain every point); `--dry_run` lists
each point's state instead. A point that fails while training (say, a NaN loss at a large learning rate)
is reported, the other points still run, and the command ends with one line naming the failures (exit 2).
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import hashlib
import io
import itertools
import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Optional

import tomllib

from .. import checkpoint as ckpt
from ..config import DataConfig, ModelConfig, TrainConfig
from ..errors import PicoError
from ..flags import FLAGS, Flag, complete, configs_from_args, train_parser
from ..plots import loss_panels, metrics_vs_param
from ..training import train, train_models
from ..training.stop import STOP
from .tensorboard import require_tensorboard, tensorboard_sinks

SPEC_KEYS = ("name", "description", "x", "base", "grid", "points")
RESERVED = ("output_dir", "run_name", "resume", "overwrite", "stop_at_step")
SWEEP_FILE, RESULTS_CSV, RESULTS_MD, LOSSES_PNG = "sweep.json", "results.csv", "results.md", "losses.png"
RESULT_COLUMNS = ("model", "params", "steps", "train_loss", "test_loss", "best_test_loss", "best_step",
                  "bits_per_byte", "tokens_per_s", "train_seconds", "continuation_accuracy")
FORMATS = {"params": "{:,}", "steps": "{}", "best_step": "{}", "train_loss": "{:.4f}", "test_loss": "{:.4f}",
           "best_test_loss": "{:.4f}", "bits_per_byte": "{:.3f}", "tokens_per_s": "{:,.0f}",
           "train_seconds": "{:.1f}", "continuation_accuracy": "{:.3f}"}
# Files a point's directory may hold when its first run died before the first checkpoint: safe to clear.
_LEFTOVERS = (ckpt.CONFIG, ckpt.TOKENIZER, ckpt.METRICS)
# Config fields that may differ between a finished point and the spec without making its numbers stale.
_IGNORED = {"model": {"vocab_size"}, "data": set(), "train": {"tensorboard", "device"}}


@dataclass
class Point:
    name: str  # the run directory's name under the sweep directory
    values: dict[str, Any]  # swept flag -> value, as the spec gives it for this point
    settings: dict[str, Any]  # every swept flag -> its value in this point (from [base] or the default if unset)
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    progress: bool = True


@dataclass
class Sweep:
    name: str
    description: str
    spec_path: str
    root: str  # OUTPUT_DIR/NAME
    base: dict[str, Any]
    swept: list[str]
    x: str
    points: list[Point]

    def run_dir(self, point: Point) -> str:
        return os.path.join(self.root, point.name)


# --------------------------------------------------------------------------- reading and validating a spec

def _text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float, str)):
        return str(v)
    raise PicoError(f"unsupported value {v!r} ({type(v).__name__})")


def _argv(key: str, value: Any, flag: Flag, where: str) -> list[str]:
    """One flag as `pico-llm train` arguments."""
    if flag.switch:
        if not isinstance(value, bool):
            raise PicoError(f"{where}: {key} is a switch; set it to true or false, not {value!r}")
        return ["--" + key] if value else []
    if flag.many:
        values = value if isinstance(value, list) else [value]
        return ["--" + key, *(_text(v) for v in values)]
    if isinstance(value, (list, dict)):
        raise PicoError(f"{where}: {key} takes one value, got {value!r}")
    try:
        return [f"--{key}={_text(value)}"]
    except PicoError as e:
        raise PicoError(f"{where}: {key}: {e}") from None


def _check_key(key: str, where: str) -> None:
    if key in RESERVED:
        raise PicoError(f"{where}: {key!r} is set by the sweep itself and may not appear in a spec")
    if key not in FLAGS:
        close = difflib.get_close_matches(key, [k for k in FLAGS if k not in RESERVED], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise PicoError(f"{where}: unknown train flag {key!r}{hint}")


def _label(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        return "+".join(_label(os.path.basename(str(i)) if isinstance(i, str) else i) for i in v)
    return str(v)


def point_name(values: dict[str, Any]) -> str:
    """A directory name from a point's swept values: `pos_emb=rope`, `n_blocks=2,n_heads=4`."""
    if not values:
        return "base"
    name = ",".join(f"{k}={_label(v)}" for k, v in values.items())
    name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", name)
    return name if len(name) <= 120 else name[:100] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]


def parse_override(item: str) -> tuple[str, Any]:
    """`KEY=VALUE` -> (key, value); VALUE is read as a TOML value when it is one, else taken as text."""
    key, sep, raw = item.partition("=")
    key = key.strip().lstrip("-")
    if not sep or not key:
        raise PicoError(f"--set {item!r}: expected KEY=VALUE, e.g. --set max_steps_per_epoch=500")
    try:
        return key, tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return key, raw


def _read_toml(path: str) -> dict:
    if not os.path.isfile(path):
        raise PicoError(f"sweep spec not found: {path}")
    try:
        with open(path, "rb") as f:
            spec = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise PicoError(f"{path}: not valid TOML: {str(e).splitlines()[0]}") from None
    except UnicodeDecodeError:
        raise PicoError(f"{path}: not UTF-8 text") from None
    for key in spec:
        if key not in SPEC_KEYS:
            close = difflib.get_close_matches(key, SPEC_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise PicoError(f"{path}: unknown top-level key {key!r}{hint}; a spec has {', '.join(SPEC_KEYS)} "
                            "(train flags go in [base], [grid] or [[points]])")
    return spec


def _spec_tables(path: str, spec: dict) -> tuple[str, str, dict, Optional[dict], Optional[list]]:
    """(name, description, base, grid, points) of a spec, each checked for its shape."""
    name = spec.get("name", os.path.splitext(os.path.basename(path))[0])
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._-]+", name) or name in (".", ".."):
        raise PicoError(f"{path}: name must be letters, digits, '.', '_' or '-', got {name!r}")
    description = spec.get("description", "")
    if not isinstance(description, str):
        raise PicoError(f"{path}: description must be a string")
    base, grid, points = spec.get("base", {}), spec.get("grid"), spec.get("points")
    if not isinstance(base, dict):
        raise PicoError(f"{path}: [base] must be a table of train flags")
    if grid is not None and not isinstance(grid, dict):
        raise PicoError(f"{path}: grid must be a table ([grid]) of flag = [values]")
    if points is not None and not (isinstance(points, list) and all(isinstance(p, dict) for p in points)):
        raise PicoError(f"{path}: points must be tables ([[points]])")
    if grid is None and points is None:
        raise PicoError(f"{path}: nothing to sweep; give a [grid] table or [[points]] tables")
    if grid is not None and not grid:
        raise PicoError(f"{path}: empty grid: [grid] lists no flags")
    if points is not None and not points:
        raise PicoError(f"{path}: empty points: points = [] lists none")
    return name, description, dict(base), grid, points


def _check_flags(path: str, base: dict, grid: dict, points: Optional[list], overrides: tuple[str, ...]) -> list[str]:
    """Every key a train flag, every grid value a non-empty list, no key both in [grid] and [[points]],
    no --set of a swept key; returns the swept keys in order."""
    for key in base:
        _check_key(key, f"{path}: [base]")
    for key, values in grid.items():
        _check_key(key, f"{path}: [grid]")
        if not isinstance(values, list):
            raise PicoError(f"{path}: [grid] {key} must be a list of values, e.g. {key} = [{_text_or(values)}]")
        if not values:
            raise PicoError(f"{path}: empty grid: [grid] {key} = [] has no values")
    for i, p in enumerate(points or []):
        for key in p:
            _check_key(key, f"{path}: [[points]] #{i + 1}")
            if key in grid:
                raise PicoError(f"{path}: {key} is in both [grid] and [[points]] #{i + 1}")
    swept = list(dict.fromkeys([k for p in points or [] for k in p] + list(grid)))
    for item in overrides:
        key = parse_override(item)[0]
        if key in swept:
            raise PicoError(f"--set {item!r}: {key} is swept by {path}; --set overrides [base] flags only")
    return swept


def build_point(pname: str, flags: dict[str, Any], values: dict[str, Any], swept: list[str], where: str,
                progress: bool) -> Point:
    """A point's configs, built as `pico-llm train FLAGS` builds them (the same parser and validation)."""
    argv = []
    for key, value in flags.items():
        argv += _argv(key, value, FLAGS[key], where)
    args = complete(train_parser(where, add_help=False).parse_args(argv))
    try:
        model_names, models, data, train_cfg = configs_from_args(args)
    except PicoError as e:
        raise PicoError(f"{where}: {e}") from None
    if len(model_names) != 1:
        raise PicoError(f"{where}: trains {len(model_names)} models; a sweep point trains one "
                        "(sweep models = [...] in [grid] to compare families)")
    for f in list(data.input_files) + [q for q in (data.input_dir, data.tinystories_path,
                                                   data.tinystories_valid_path) if q]:
        if not os.path.exists(f):
            raise PicoError(f"{where}: {f}: no such file or directory")
    return Point(pname, values, {k: getattr(args, k) for k in swept}, models[model_names[0]], data, train_cfg,
                 progress=progress and not args.no_progress)


def load_spec(path: str, output_dir: str = "runs", overrides: tuple[str, ...] = (), tensorboard: bool = False,
              progress: bool = True) -> Sweep:
    """Reads and validates a spec completely (every point parsed and its configs built) without touching
    the disk; a PicoError names the first problem."""
    spec = _read_toml(path)
    name, description, base, grid, points = _spec_tables(path, spec)
    for item in overrides:
        key, value = parse_override(item)
        _check_key(key, f"--set {item!r}")
        base[key] = value
    if tensorboard:
        base["tensorboard"] = True
    grid = grid or {}
    swept = _check_flags(path, base, grid, points, overrides)
    x = spec.get("x")
    if x is not None and x not in swept + ["run"]:
        raise PicoError(f"{path}: x = {x!r} is not a swept flag ({', '.join(swept) or 'none'}) nor 'run'")

    combos = [dict(zip(grid, vs)) for vs in itertools.product(*grid.values())] if grid else [{}]
    built: list[Point] = []
    for p in points or [{}]:
        for combo in combos:
            values = {**p, **combo}
            pname = point_name(values)
            if any(b.name == pname for b in built):
                raise PicoError(f"{path}: the point {pname} is listed twice")
            built.append(build_point(pname, {**base, **values}, values, swept, f"{path}: point {pname}", progress))
    if x is None:  # the first swept flag when every point sets it, else the points by name
        x = swept[0] if swept and all(swept[0] in p.values for p in built) else "run"
    if any(p.train.tensorboard for p in built):
        require_tensorboard()
    return Sweep(name, description, path, os.path.join(output_dir, name), base, swept, x, built)


def _text_or(v: Any) -> str:
    try:
        return repr(v) if isinstance(v, str) else _text(v)
    except PicoError:
        return "..."


# --------------------------------------------------------------------------- state of each point on disk

def point_state(run_dir: str) -> str:
    """'new' (nothing there), 'finished', 'unfinished' (a checkpoint, no summary), 'stale' (a first run
    that died before its first checkpoint) or 'foreign' (something else)."""
    if not os.path.exists(run_dir):
        return "new"
    if ckpt.is_run(run_dir):
        return "finished" if os.path.isfile(os.path.join(run_dir, ckpt.SUMMARY)) else "unfinished"
    if not os.path.isdir(run_dir):
        return "foreign"
    left = [f for f in os.listdir(run_dir) if not (f.startswith(".") or f.startswith("events.out.tfevents."))]
    return "stale" if all(f in _LEFTOVERS for f in left) else "foreign"


def config_differences(point: Point, run_dir: str) -> list[str]:
    """'section.field: stored -> wanted' for each setting a run directory was trained with that differs
    from the point's."""
    have = dict(zip(("model", "data", "train"), ckpt.load_config(run_dir)))
    want = {"model": point.model, "data": point.data, "train": point.train}
    out = []
    for section in ("model", "data", "train"):
        h, w = have[section].to_dict(), want[section].to_dict()
        for k in w:
            if k not in _IGNORED[section] and h.get(k) != w[k]:
                out.append(f"{k}: {h.get(k)!r} -> {w[k]!r}")
    return out


def _check_disk(sweep: Sweep, overwrite: bool, strict: bool = True) -> dict[str, str]:
    """point name -> state; a point directory in the way is an error (strict) or a state of its own."""
    states = {}
    for pt in sweep.points:
        d = sweep.run_dir(pt)
        state = states[pt.name] = point_state(d)
        if state == "foreign":
            if strict:
                raise PicoError(f"{d} exists and is not a run of this sweep; move it away or use another --output_dir")
            states[pt.name] = "in the way: not a run of this sweep"
        if state in ("finished", "unfinished") and not overwrite:
            diff = config_differences(pt, d)
            if diff and strict:
                raise PicoError(f"{d} was trained with other settings ({'; '.join(diff[:3])}); use another "
                                "--output_dir, or --overwrite to retrain every point")
            if diff:
                states[pt.name] = f"{state} with other settings: {'; '.join(diff[:3])}"
    return states


def _clear_stale(run_dir: str) -> None:
    shutil.rmtree(run_dir)  # point_state found only a dead first attempt's files in it


# --------------------------------------------------------------------------- running

def _train_point(sweep: Sweep, pt: Point, state: str, overwrite: bool, head: str, log: Callable[[str], None]) -> dict:
    """Trains one sweep point (resuming it when unfinished); its summary, or its stop record."""
    d = sweep.run_dir(pt)
    if state == "unfinished" and not overwrite:
        log(f"{head}: resuming {d}")
        mcfg, dcfg, tcfg = ckpt.load_config(d)
        tcfg = dataclasses.replace(tcfg, tensorboard=pt.train.tensorboard)
        return train(mcfg, dcfg, tcfg, d, resume=True, progress=pt.progress, log=log, sinks=tensorboard_sinks(tcfg)(d))
    log(f"{head}: training {d}")
    if state == "stale":
        _clear_stale(d)
    return train_models([pt.model.model], {pt.model.model: pt.model}, pt.data, pt.train, sweep.root, pt.name,
                        overwrite=overwrite, progress=pt.progress, log=log,
                        sinks=tensorboard_sinks(pt.train))[pt.model.model]


def run_sweep(path: str, output_dir: str = "runs", overrides: tuple[str, ...] = (), *, tensorboard: bool = False,
              overwrite: bool = False, progress: bool = True, dry_run: bool = False,
              log: Callable[[str], None] = print) -> Sweep:
    """Validate the spec and the sweep directory, then train every point that is not finished, in order;
    write the results table and plots. Returns the Sweep (its results: `results(sweep)`)."""
    sweep = load_spec(path, output_dir, overrides, tensorboard=tensorboard, progress=progress)
    states = _check_disk(sweep, overwrite, strict=not dry_run)
    n = len(sweep.points)
    if dry_run:
        for i, pt in enumerate(sweep.points, 1):
            log(f"[{i}/{n}] {sweep.run_dir(pt)}  ({'to train' if overwrite else states[pt.name]})")
        return sweep
    os.makedirs(sweep.root, exist_ok=True)
    ckpt.write_json(os.path.join(sweep.root, SWEEP_FILE), {
        "name": sweep.name, "description": sweep.description, "spec": os.path.abspath(path), "x": sweep.x,
        "swept": sweep.swept, "base": sweep.base, "points": [{"run": p.name, "values": p.values, "settings": p.settings}
                                                 for p in sweep.points]})
    failed = []
    with STOP:  # a signal stops the sweep, not just the point being trained
        for i, pt in enumerate(sweep.points, 1):
            d, state = sweep.run_dir(pt), states[pt.name]
            head = f"[{i}/{n}] {pt.name}"
            if state == "finished" and not overwrite:
                log(f"{head}: finished, skipped ({d})")
                continue
            try:
                summary = _train_point(sweep, pt, state, overwrite, head, log)
            except PicoError as e:  # e.g. a diverging learning rate: a result too; the other points still run
                log(f"{head}: failed: {e}")
                failed.append(f"{pt.name} ({e})")
                continue
            if "stopped_at" in summary:
                left = [pt.name] + [p.name for p in sweep.points[i:] if overwrite or states[p.name] != "finished"]
                why = f" by {STOP.name}" if STOP.requested else ""
                log(f"sweep stopped{why} during {pt.name}; {len(left)} of {n} points left ({', '.join(left)}); "
                    "run the same command again to continue")
                return sweep
    write_results(sweep, log=log)
    if failed:
        raise PicoError(f"{len(failed)} of {n} sweep points failed: {'; '.join(failed)}")
    return sweep


# --------------------------------------------------------------------------- results

def read_sweep(root: str) -> Optional[dict]:
    """The sweep.json of a sweep directory, or None when `root` is not one."""
    p = os.path.join(root, SWEEP_FILE)
    if not os.path.isfile(p):
        return None
    try:
        with open(p) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise PicoError(f"{p}: unreadable ({type(e).__name__})") from None


def results(root: str, meta: Optional[dict] = None) -> list[dict]:
    """One row per finished point of a sweep directory: run, swept values, then RESULT_COLUMNS."""
    meta = meta or read_sweep(root)
    if meta is None:
        raise PicoError(f"{root} is not a sweep directory (no {SWEEP_FILE})")
    rows = []
    for p in meta["points"]:
        d = os.path.join(root, p["run"])
        if not os.path.isfile(os.path.join(d, ckpt.SUMMARY)):
            continue
        s = ckpt.read_summary(d)
        rows.append({"run": p["run"], **p.get("settings", p["values"]), **{k: s.get(k) for k in RESULT_COLUMNS}})
    return rows


def _cell(key: str, v: Any) -> str:
    if v is None:
        return ""
    if key in FORMATS and isinstance(v, (int, float)) and not isinstance(v, bool):
        return FORMATS[key].format(v)
    return _label(v)


def result_columns(rows: list[dict], swept: list[str]) -> list[str]:
    """The swept keys, then the result columns any row has a value in: a results table's columns."""
    return swept + [c for c in RESULT_COLUMNS if any(r.get(c) is not None for r in rows)]


def results_markdown(rows: list[dict], swept: list[str]) -> str:
    cols = result_columns(rows, swept)
    head = [c if c in swept else c.replace("_", " ") for c in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if c in swept or c == "model" else "---:"
                                                         for c in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_cell(c, r.get(c)).replace("|", "\\|") for c in cols) + " |")
    return "\n".join(lines) + "\n"


def results_csv(rows: list[dict], swept: list[str]) -> str:
    cols = ["run"] + swept + list(RESULT_COLUMNS)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow(["" if r.get(c) is None else _label(r[c]) if c in swept else r[c] for c in cols])
    return buf.getvalue()


def metrics_plot_name(x: str) -> str:
    return f"metrics_vs_{x}.png"


def series_labels(rows: list[dict], swept: list[str], x: str) -> Optional[str]:
    """Adds a '_series' label (the other swept values) to each row; returns its key, or None if x is the
    only swept flag."""
    others = [k for k in swept if k != x]
    if not others:
        return None
    for r in rows:
        r["_series"] = ",".join(f"{k}={_label(r.get(k))}" for k in others)
    return "_series"


def sweep_figures(root: str, meta: dict, rows: list[dict], loss_out, metrics_out) -> None:
    """The overlaid loss curves and the metrics-against-x figure of a sweep (to paths or binary files)."""
    loss_panels({r["run"]: ckpt.read_metrics(os.path.join(root, r["run"])) for r in rows}, loss_out,
                title=f"sweep {meta['name']}: loss")
    panels = [["test_loss", "best_test_loss", "train_loss"]]
    if any(r.get("continuation_accuracy") is not None for r in rows):
        panels.append(["continuation_accuracy"])
    x = meta["x"]
    rows = [dict(r) for r in rows]
    if any(isinstance(r.get(x), (list, type(None))) for r in rows):
        for r in rows:
            r[x] = _label(r.get(x))
    series = series_labels(rows, meta["swept"], x) if x != "run" else None
    metrics_vs_param(rows, x, panels, metrics_out, series=series, title=f"sweep {meta['name']}")


def write_results(sweep: Sweep, log: Callable[[str], None] = print) -> list[dict]:
    meta = read_sweep(sweep.root)
    rows = results(sweep.root, meta)
    if not rows:
        return rows
    md = results_markdown(rows, sweep.swept)
    ckpt.write_text(os.path.join(sweep.root, RESULTS_MD), f"# Sweep {sweep.name}\n\n" +
                    (f"{sweep.description}\n\n" if sweep.description else "") + md)
    ckpt.write_text(os.path.join(sweep.root, RESULTS_CSV), results_csv(rows, sweep.swept))
    with ckpt.atomic_path(os.path.join(sweep.root, LOSSES_PNG)) as loss_tmp, \
            ckpt.atomic_path(os.path.join(sweep.root, metrics_plot_name(sweep.x))) as metrics_tmp:
        sweep_figures(sweep.root, meta, rows, loss_tmp, metrics_tmp)
    log("\n" + md)
    log(f"results: {os.path.join(sweep.root, RESULTS_MD)}, {RESULTS_CSV}, {LOSSES_PNG}, {metrics_plot_name(sweep.x)}")
    return rows
