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

Loading checks what saving checks: :func:`load_arrays` refuses a file that is not an ``.npz``
(truncated, foreign) and arrays holding NaN or inf, naming the file and the array. Nothing else
in the package opens a file for writing.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
import zipfile
import zlib
from pathlib import Path

import numpy as np
from numpy.lib.npyio import NpzFile

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


def _siblings(path: Path, kind: str) -> list:
    """Folders beside ``path`` named ``.{name}.{kind}-*`` (prefix match, not a glob, so a name
    holding ``[`` or ``*`` cannot match other folders), newest first."""
    if not path.parent.is_dir():
        return []
    prefix = f".{path.name}.{kind}-"
    found = [p for p in path.parent.iterdir() if p.name.startswith(prefix)]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def _parked(path: Path) -> list:
    """Old copies of folder ``path`` set aside by an interrupted swap, newest first."""
    return _siblings(path, "old")


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
def atomic_directory(path, marker: str | None = None):
    """Write a folder as one unit: ``with atomic_directory(dir) as tmp:`` write every file into
    ``tmp``; on success the folder ``tmp`` replaces ``dir`` whole, on an error ``dir`` is left as it
    was. Stale temporary and parked folders from earlier crashes are removed first.

    The old folder is replaced whole, so files in it that this save does not write disappear.
    ``marker`` (a file every save of this kind writes, e.g. ``config.json``) guards against
    deleting the wrong folder: a non-empty ``dir`` without it is not an earlier save, and is
    refused, never replaced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a folder; choose another path")
    if marker is not None and path.is_dir() and any(path.iterdir()) and not (path / marker).is_file():
        raise FileExistsError(f"{path} is not empty and holds no {marker}, so it is not an earlier "
                              "save; refusing to replace it: save into a new or empty folder")
    for stale in [*_siblings(path, "tmp"), *_parked(path)]:
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private (0700); a saved folder is an ordinary folder
    try:
        yield tmp
        for f in tmp.rglob("*"):  # every file on disk before the swap makes it visible
            if f.is_file():
                with open(f, "rb") as handle:
                    os.fsync(handle.fileno())
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:12]}" if path.exists() else None
    if old is not None:
        os.rename(path, old)   # park the old save; a crash right here is undone by recover_directory
    try:
        os.rename(tmp, path)   # the new save appears whole
    except BaseException:      # e.g. a concurrent writer recreated `path`: put the old save back
        if old is not None and not path.exists():
            os.rename(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


def save_figure(path, fig, dpi: int = 110) -> Path:
    """Write a matplotlib figure as PNG, atomically (``fig`` is only asked to ``savefig`` itself)."""
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))


def save_arrays(path, arrays: dict) -> Path:
    """Write name -> array (NumPy or CuPy) to an uncompressed ``.npz``, atomically."""
    host = {name: backend.to_numpy(a) for name, a in arrays.items()}
    for name, a in host.items():
        if a.dtype == object:
            raise TypeError(f"array {name!r} has dtype object, which would need pickle; refusing")
    return atomic_write(path, lambda f: np.savez(f, **host))


def load_arrays(path) -> dict:
    """Read an ``.npz`` into a dict of NumPy arrays, never unpickling anything.

    Refuses what :func:`save_arrays` would never write: a file that is not an ``.npz`` archive
    (truncated, foreign, or an object array needing pickle) and floating arrays holding NaN or
    inf (a broken model must not load silently), naming the file and the array.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, NpzFile):
            raise ValueError("it holds a single array (.npy), not an archive of named arrays")
        with npz:
            arrays = {name: npz[name] for name in npz.files}
    except (ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        # for any file that is not an array, NumPy suggests unpickling it: wrong advice here
        why = str(err)
        if "Object arrays" in why:
            why = "it holds an object array, which only pickle could read"
        elif "pickle" in why:
            why = "it is neither a zip archive nor an array"
        raise ValueError(f"{path} is not a valid .npz (truncated, or not written by this "
                         f"package?): {why}") from None
    for name, a in arrays.items():
        if a.dtype.kind in "fc" and not np.isfinite(a).all():
            raise ValueError(f"array {name!r} in {path} holds NaN or inf; refusing to load a "
                             "broken file (was it saved from a diverged run?)")
    return arrays


def save_json(path, obj) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def load_json(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON (truncated or edited by hand?): {err}") from None


def file_size(path) -> int:
    return Path(path).stat().st_size
