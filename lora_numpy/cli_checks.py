"""Floor 9: what the command line checks before any training, and the lock on an output folder.

Every flag is checked in well under a second, before a base model is pretrained: a bad value
fails naming the flag, the value and the fix, not after minutes of work. Target modules are
checked against the model the command will build, using a skeleton of it (the same layers at
width 1: its module names, at no cost). Errors are ``ValueError``; ``cli.main`` prints them as
``error: ...`` and exits with code 2.

Two runs writing into one output folder at once would mix their files, and ``results.json``
could describe files the other run replaced. So a run holds a lock beside its folder: a file
created atomically (``O_CREAT | O_EXCL``: exactly one process can create it) holding the
owner's pid, removed when the run ends. A lock whose pid is dead (a run killed with ``kill -9``)
is stale and taken over. The lock is the one file the package writes outside ``io.py``: it holds
no data, and its creation must fail when it exists, which an atomic rename cannot express.
"""
from __future__ import annotations

import contextlib
import errno
import math
import os
from pathlib import Path

import numpy as np

from .experiments import METHODS
from .nn import Embedding, Linear
from .peft import get_peft_model
from .peft.targets import matches
from .recipes import ModelSize, build_model, make_task


def flag(name: str) -> str:
    """The command-line spelling of an argparse destination: batch_size -> --batch-size."""
    return "--" + name.replace("_", "-")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def check_counts(args, names, minimum: int = 1) -> None:
    """Integer flags that count something (steps, examples, layers): each >= ``minimum``."""
    for name in names:
        value = getattr(args, name)
        _require(value is None or value >= minimum, f"{flag(name)} must be >= {minimum}, got {value}")


def check_lr(name: str, value) -> None:
    _require(value is None or (math.isfinite(value) and value > 0),
             f"{flag(name)} must be a finite learning rate > 0, got {value}")


def check_seeds(name: str, seeds) -> None:
    """Seeds feed np.random.default_rng, which takes integers >= 0; a repeated seed would count
    one outcome twice in a spread over seeds."""
    shown = " ".join(map(str, seeds)) if isinstance(seeds, (list, tuple)) else str(seeds)
    seeds = list(seeds) if isinstance(seeds, (list, tuple)) else [seeds]
    _require(all(s >= 0 for s in seeds), f"{flag(name)} takes integers >= 0, got {shown}")
    _require(len(set(seeds)) == len(seeds), f"{flag(name)} repeats a seed: {shown}")


def check_model_size(args) -> ModelSize:
    check_counts(args, ("n_layer", "n_head", "n_embd"))
    _require(args.n_embd % args.n_head == 0,
             f"--n-embd {args.n_embd} must be divisible by --n-head {args.n_head} (each head gets "
             f"n_embd / n_head dimensions), e.g. --n-embd {args.n_head * max(1, round(args.n_embd / args.n_head))}")
    return ModelSize(args.n_layer, args.n_head, args.n_embd)


def check_text_file(args) -> None:
    """--text-file only means something for --task text; there it must be readable UTF-8 text
    long enough for a training window and a validation window."""
    if args.text_file is None:
        return
    path = Path(args.text_file)
    _require(args.task == "text", f"--text-file {path} only applies to --task text (got --task {args.task}); "
                                  "drop --text-file, or add --task text")
    _require(path.is_file(), f"--text-file {path} is not a file" + ("" if path.exists() else " (no such path)"))
    try:
        path.read_bytes().decode("utf-8")
    except PermissionError:
        raise ValueError(f"--text-file {path} cannot be read (permission denied)") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"--text-file {path} is not UTF-8 text (byte {err.start}: {err.reason}); "
                         "convert it first, e.g. iconv -t utf-8") from None
    task = make_task("text", str(path))
    try:
        for split in ("train", "val"):
            task.data.get_batch(split, 1, task.block_size, np.random.default_rng(0))
    except ValueError as err:
        raise ValueError(f"--text-file {path} is too short: {err}") from None


def usable_folder(path, name: str, given=None) -> Path:
    """Check that folder ``path`` exists or can be created, and can be written, without creating
    anything (a refused command leaves no trace): a file in its place or in the place of a folder
    above it, or a folder that cannot be written, is an error now, not after training.
    ``given`` is the flag's value when ``path`` is derived from it."""
    path = Path(path)
    shown = f"{flag(name)} {given if given is not None else path}"
    existing = next(p for p in (path, *path.parents) if p.exists())  # the folder, or where it would start
    _require(existing.is_dir(), f"{shown}: {existing} is a file, not a folder; choose another path")
    _require(os.access(existing, os.W_OK | os.X_OK), f"{shown}: {existing} is not writable; choose a "
                                                     "folder you can write to")
    return path


def check_pretrain_out(path) -> None:
    """``pretrain`` saves its folder whole (io.atomic_directory with marker config.json), which
    refuses to replace a non-empty folder that is not an earlier save. Say so now."""
    path = Path(path)
    usable_folder(path.parent, "out", given=path)  # the save is built beside the folder, then swapped in
    _require(not path.exists() or path.is_dir(), f"--out {path}: {path} is a file, not a folder; choose another path")
    _require(not path.is_dir() or not any(path.iterdir()) or (path / "config.json").is_file(),
             f"--out {path} holds files but no config.json, so it is not an earlier model save; "
             "choose a new or empty folder (the save replaces the folder whole)")


def check_pretrain_args(args) -> None:
    """Everything ``pretrain`` needs, checked before the model is built."""
    check_counts(args, ("steps", "batch_size"))
    check_lr("lr", args.lr)
    check_seeds("seed", args.seed)
    check_model_size(args)
    check_text_file(args)
    check_pretrain_out(args.out)


def check_adapter_args(args) -> None:
    """--rank (at most the model width: a rank-r update needs r <= both sides of a matrix) and
    --alpha; --target-modules is checked once the config is built (:func:`check_targets`)."""
    _require(args.rank >= 1, f"--rank must be >= 1, got {args.rank}")
    _require(args.rank <= args.n_embd,
             f"--rank {args.rank} is larger than the model width --n-embd {args.n_embd}: a rank-r update "
             f"of a {args.n_embd}-wide matrix needs r <= {args.n_embd}")
    _require(math.isfinite(args.alpha) and args.alpha > 0, f"--alpha must be a finite number > 0, got {args.alpha}")


def check_targets(lora, target_name: str, n_layer: int) -> None:
    """Apply ``lora`` to a skeleton of the model `compare` fine-tunes: its real layer names at
    width r (the narrowest a rank-r adapter fits; --rank <= --n-embd is checked before), so an
    unknown target fails now, listing the layer names there are."""
    target = make_task(target_name)
    skeleton = target.make_model(build_model(target, ModelSize(n_layer, 1, lora.r)))
    layers = [n for n, m in skeleton.named_modules() if isinstance(m, (Linear, Embedding))]
    if not isinstance(lora.target_modules, str):
        unknown = [t for t in lora.target_modules if not any(matches(n, [t]) for n in layers)]
        short = list(dict.fromkeys(n.rpartition(".")[2] for n in layers))
        _require(not unknown, f"--target-modules {' '.join(unknown)}: no such layer in this model; "
                              f"choose among {' '.join(short)}, or all-linear")
    try:
        get_peft_model(skeleton, lora)
    except ValueError as err:
        raise ValueError(f"--target-modules: {err}") from None


def check_compare_args(args) -> None:
    """The values of ``compare``'s flags, checked before a base is pretrained. Then, in this
    order: the config is built (its own checks), :func:`check_targets`, :func:`check_compare_folders`."""
    check_counts(args, ("steps", "batch_size", "base_steps", "max_train"))
    check_counts(args, ("eval_every",), minimum=0)
    check_seeds("seeds", args.seeds)
    methods = args.methods or ()  # None: the target's default methods
    _require(len(set(methods)) == len(methods), f"--methods repeats a method: {args.methods}")
    for name in METHODS:
        check_lr(f"lr_{name}", getattr(args, f"lr_{name}"))
    check_model_size(args)
    if not methods or any(METHODS[m].has_adapter for m in methods):
        check_adapter_args(args)


def check_compare_folders(args) -> None:
    """--out and --cache; checked last, once every value is known to be good."""
    usable_folder(args.out, "out")
    usable_folder(args.cache, "cache")


# ---- one run per output folder ------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True      # it exists, owned by another user
    return True


def _lock_owner(lock: Path) -> int | None:
    try:
        return int(lock.read_text().strip())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def output_lock(folder):
    """Hold ``.{name}.lock`` beside ``folder`` for the duration of a run; refuse if another live
    run holds it, take it over if its run is dead."""
    folder = Path(folder).resolve()
    lock = folder.parent / f".{folder.name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            pid = _lock_owner(lock)
            if pid is None or _pid_alive(pid):
                who = f"pid {pid}" if pid is not None else "an unknown process"
                raise RuntimeError(f"{folder} is in use by another run ({who} holds {lock}): wait for it "
                                   "to finish or choose another --out; if no run is going, delete the lock") from None
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()  # stale: its run died without removing it
    else:
        raise RuntimeError(f"could not take the lock {lock}: another run keeps recreating it")
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
    finally:
        os.close(fd)
    try:
        yield lock
    finally:
        if _lock_owner(lock) == os.getpid():
            lock.unlink()


# ---- errors from the operating system during a run ----------------------------------------------
FIXES = {errno.ENOSPC: "free some disk space, or choose another --out / --cache",
         errno.EDQUOT: "free some of your disk quota, or choose another --out / --cache",
         errno.EACCES: "choose a folder you can write to with --out / --cache",
         errno.EPERM: "choose a folder you can write to with --out / --cache",
         errno.EROFS: "the disk is read-only: choose another --out / --cache",
         errno.ENOTDIR: "a file stands where a folder is needed: choose another path",
         errno.EEXIST: "a file stands where a folder is needed: choose another path",
         errno.EISDIR: "a folder stands where a file is needed: choose another path"}


def os_error_line(err: OSError) -> str:
    """One line for an OSError: the path, what went wrong, and a fix."""
    if err.filename is None or err.strerror is None:
        return str(err)  # the package's own message, already naming the path
    fix = FIXES.get(err.errno, "check the path and its permissions")
    return f"{err.filename}: {err.strerror}; {fix}"
