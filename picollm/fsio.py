"""Files written so that a crash never leaves half of one in place of a good one, and the cache
directory. The one atomic writer of the project: checkpoints, tokenizers, reports and exports use it."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any


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
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a run directory is meant to be shared
        os.replace(tmp, path)
        fsync_dir(d)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, obj: Any) -> None:
    with atomic_path(str(path)) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2)


def write_text(path: str, text: str) -> None:
    with atomic_path(str(path)) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
