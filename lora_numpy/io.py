"""Floor 2: files. Arrays go in ``.npz`` (read back with ``allow_pickle=False``: nothing is ever
unpickled, so a file from a stranger cannot run code), settings in JSON. Every write goes to a
temporary file in the same folder and is then renamed over the target: a crash or a bad value
halfway leaves the old file whole, never a torn one."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from . import backend


def _atomic_write(path, write) -> Path:
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
    return path


def save_arrays(path, arrays: dict) -> Path:
    """Write name -> array (NumPy or CuPy) to an uncompressed ``.npz``, atomically."""
    host = {name: backend.to_numpy(a) for name, a in arrays.items()}
    for name, a in host.items():
        if a.dtype == object:
            raise TypeError(f"array {name!r} has dtype object, which would need pickle; refusing")
    return _atomic_write(path, lambda f: np.savez(f, **host))


def load_arrays(path) -> dict:
    """Read an ``.npz`` into a dict of NumPy arrays, never unpickling anything."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    with np.load(path, allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


def save_json(path, obj) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    return _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def load_json(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    return json.loads(path.read_text(encoding="utf-8"))


def file_size(path) -> int:
    return Path(path).stat().st_size
