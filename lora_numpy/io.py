"""Floor 2: files. Arrays go in ``.npz`` (read back with ``allow_pickle=False``: nothing is ever
unpickled, so a file from a stranger cannot run code), settings in JSON.

Two rules make every save all-or-nothing, whatever the moment of a crash (``kill -9`` included):

* one file: written to a temporary sibling, flushed to disk, then renamed over the target
  (:func:`atomic_write`). A rename within one folder is atomic, so a reader sees the old file or
  the new one, never a torn one.
* a save of several files (a checkpoint, an adapter): written whole into a temporary sibling
  folder, then swapped in for the old folder (:func:`atomic_directory`). Two renames do the swap;
  a crash between them leaves the old folder parked beside the new one, and
  :func:`recover_directory` (called by every loader and by the next save) puts it back.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import numpy as np

from . import backend


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write) -> Path:
    """Call ``write(binary_file)`` on a temporary sibling of ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows
    except BaseException:
        os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def _parked(path: Path) -> list:
    """Old copies of folder ``path`` set aside by an interrupted swap, newest first."""
    return sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime, reverse=True)


def recover_directory(path) -> Path:
    """Finish what a crash interrupted: if ``path`` is missing but an old copy was parked beside
    it mid-swap, move that copy back. Leftover temporary folders stay (the next save removes
    them): they were never complete saves."""
    path = Path(path)
    if not path.exists():
        parked = _parked(path)
        if parked:
            os.rename(parked[0], path)
    return path


@contextlib.contextmanager
def atomic_directory(path):
    """Write a folder as one unit: ``with atomic_directory(dir) as tmp:`` write every file into
    ``tmp``; on success the folder ``tmp`` replaces ``dir`` whole, on an error ``dir`` is left as it
    was. Stale temporary and parked folders from earlier crashes are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(path)
    for stale in [*path.parent.glob(f".{path.name}.tmp-*"), *_parked(path)]:
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        yield tmp
        for f in tmp.rglob("*"):  # every file on disk before the swap makes it visible
            if f.is_file():
                with open(f, "rb") as handle:
                    os.fsync(handle.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        if not path.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            raise NotADirectoryError(f"{path} exists and is not a folder; choose another path")
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:12]}"
        os.rename(path, old)   # park the old save; a crash right here is undone by recover_directory
        os.rename(tmp, path)   # the new save appears whole
        _fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, path)
        _fsync_dir(path.parent)
    return path


def save_arrays(path, arrays: dict) -> Path:
    """Write name -> array (NumPy or CuPy) to an uncompressed ``.npz``, atomically."""
    host = {name: backend.to_numpy(a) for name, a in arrays.items()}
    for name, a in host.items():
        if a.dtype == object:
            raise TypeError(f"array {name!r} has dtype object, which would need pickle; refusing")
    return atomic_write(path, lambda f: np.savez(f, **host))


def load_arrays(path) -> dict:
    """Read an ``.npz`` into a dict of NumPy arrays, never unpickling anything."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    with np.load(path, allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


def save_json(path, obj) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def load_json(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    return json.loads(path.read_text(encoding="utf-8"))


def file_size(path) -> int:
    return Path(path).stat().st_size
