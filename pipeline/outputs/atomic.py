"""The one way anything is written atomically, and its one temp-name convention.

Every file or folder is first written under ``temp_path(final)``, a hidden name in the same
folder (``.<name>.tmp-<pid>-<random>``: folder reads never see it, the rename is atomic),
then renamed over the final name by ``publish``. ``TEMP_PATTERN`` is therefore the only glob
clean-up of killed runs needs. (Kept apart from `layout` because the writers use it and
`layout` builds the writers.)
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

TEMP_PATTERN = ".*.tmp-*"


def temp_path(path: str | os.PathLike) -> Path:
    """The hidden temp name ``path`` is written under before ``publish`` renames it."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder: makes a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def umask() -> int:
    """The process umask, read without changing it (``os.umask`` can only set-and-return,
    which would race with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no /proc (macOS): the set-and-restore fallback
    os.umask(mask)
    return mask


def publish(tmp: Path, path: Path, *, durable: bool = True) -> Path:
    """Rename ``tmp`` over ``path`` (a folder replaces an older folder); ``durable`` fsyncs
    the file before and its folder after, so a crash leaves the old or the new, never half.

    A file gets the mode a plain ``open`` would give it (0666 less the umask, e.g. 0644):
    temp-file helpers such as ``mkstemp`` create 0600, and reports on a shared results
    folder must be readable by the group like every other output."""
    if tmp.is_file():
        os.chmod(tmp, 0o666 & ~umask())
    if durable and tmp.is_file():
        fsync_path(tmp)
    if tmp.is_dir() and path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    if durable:
        fsync_path(path.parent)
    return path


def discard(tmp: Path) -> None:
    """Remove a temp file or folder, if it is there."""
    if tmp.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_write(path: str | os.PathLike, *, durable: bool = True) -> Iterator[Path]:
    """``with atomic_write(p) as tmp: <write tmp>``: ``p`` appears complete or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        publish(tmp, path, durable=durable)
    finally:
        discard(tmp)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as JSON to ``path`` via a temp file, fsync and rename: all or nothing."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")
    return Path(path)


def _json_default(obj: Any) -> Any:
    """JSON for the few non-JSON types run records hold: numpy scalars/arrays and paths."""
    if isinstance(obj, np.generic | np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")
