"""Files written so that a crash never leaves half of one in place of a good one, and the cache
directory. The one atomic writer of the project: checkpoints, tokenizers, reports and exports use it."""

from __future__ import annotations

import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

from .errors import PicoError


def cache_dir() -> Path:
    """$PICOLLM_CACHE_DIR, else ~/.cache/picollm: trained tokenizers, compiled kernels."""
    return Path(os.environ.get("PICOLLM_CACHE_DIR") or Path.home() / ".cache" / "picollm")


def fsync_dir(d: str) -> None:
    """Makes renames in d durable (where the platform allows opening a directory)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def umask() -> int:
    """The process's umask: read from /proc where there is one (setting it to read it back races with
    other threads creating files), else set and restored."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def chmod_as_open(path: str) -> None:
    """Gives path the mode a plain open() would have, 0666 less the umask: mkstemp and safetensors'
    writer make 0600, and a run directory is meant to be shared."""
    os.chmod(path, 0o666 & ~umask())


@contextmanager
def atomic_path(path: str):
    """Yields a temporary path beside `path`; on success fsyncs it and renames it over `path`."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        chmod_as_open(tmp)
        os.replace(tmp, path)
        fsync_dir(d)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def finite(obj: Any) -> Any:
    """obj with every NaN or infinite float replaced by None: JSON has no NaN (Python writes a bare `NaN`
    that strict parsers, browsers and jq refuse), and null says "not defined" in every reader."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def json_text(obj: Any, indent: Optional[int] = None) -> str:
    """Strict JSON of obj (see `finite`): what every JSON file a run writes holds."""
    return json.dumps(finite(obj), indent=indent, allow_nan=False)


def write_json(path: str, obj: Any) -> None:
    write_text(path, json_text(obj, indent=2))


def output_file(out: Optional[str], default_dir: str, name: str) -> str:
    """Where a command writes its file: default_dir/name without --out, out/name when out is a directory
    (or ends in a separator), else out; its directory must exist (one-line PicoError)."""
    if out is None:
        out = os.path.join(default_dir, name)
    elif os.path.isdir(out) or out.endswith(os.sep):
        out = os.path.join(out, name)
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise PicoError(f"--out {out}: directory {parent} does not exist")
    return out


def write_text(path: str, text: str) -> None:
    with atomic_path(str(path)) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
