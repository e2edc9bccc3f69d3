"""Floor 8: the base models of an experiment, one per seed, pretrained once and cached.

Run k of a comparison fine-tunes the base pretrained with seed k, so a base's randomness is part
of every spread. A base is cached under a digest of everything that changes its bits: the
settings of its pretraining, its seed, and the machine's arithmetic (``machine``). A base
pretrained on another machine (another BLAS kernel, another NumPy) is therefore pretrained
again rather than mistaken for this machine's.
"""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .. import parallel
from ..recipes import PRETRAIN_LR, VAL_FRACTION, TextTask, make_task, pretrain
from .runner import Job


@functools.lru_cache(maxsize=8)
def task(name: str, max_train: int | None = None):
    """``make_task``, built once per process (a task's data take a moment to build)."""
    return make_task(name, max_train=max_train)


def machine() -> dict:
    """What besides the settings changes a base's last bits: NumPy (its SIMD loops), BLAS's
    kernel and the CPU features NumPy dispatches on. Not the thread count: a run's bits do not
    depend on it (parallel.py), and every base is pretrained on one thread."""
    from numpy._core._multiarray_umath import __cpu_features__
    return {"numpy": np.__version__, "blas": parallel.blas_core(),
            "cpu": sorted(k for k, on in __cpu_features__.items() if on)}


def base_settings(cfg, seed: int) -> dict:
    """Everything that changes the base pretrained with ``seed``: its cache key (a text base adds
    its context, its kind and a digest of the text, which changes a little between Python versions)."""
    source = task(cfg.source)
    settings = {"source": cfg.source, "size": asdict(cfg.size), "steps": cfg.base_steps,
                "batch_size": cfg.train.batch_size, "lr": PRETRAIN_LR, "seed": seed,
                "vocabulary": source.data.tokenizer.chars, "val_fraction": VAL_FRACTION, "machine": machine()}
    if isinstance(source, TextTask):
        tokens = np.concatenate([source.data.train_tokens, source.data.val_tokens])
        settings.update(block_size=source.block_size, causal=source.causal,
                        mask_token=source.data.tokenizer.mask_token,
                        text_sha256=hashlib.sha256(tokens.tobytes()).hexdigest())
    return settings


def base_dir(cfg, seed: int) -> Path:
    """The cache folder of the base pretrained with ``seed``, named after its settings' digest."""
    digest = hashlib.sha256(json.dumps(base_settings(cfg, seed), sort_keys=True).encode()).hexdigest()[:10]
    s = cfg.size
    return Path(cfg.cache) / f"base-{cfg.source.replace(',', '+')}-L{s.n_layer}-d{s.n_embd}-s{seed}-{digest}"


def pretrain_base(cfg, seed: int) -> dict:
    """Pretrain the base of ``seed`` into its cache folder (a job); return its report."""
    return pretrain(cfg.source, cfg.base_steps, base_dir(cfg, seed), cfg.size, cfg.train.batch_size, seed=seed,
                    progress=False)[1]


def base_model(cfg, seed: int = 0, progress: bool = True) -> Path:
    """The folder of the base pretrained with ``seed``, pretrained here first if the cache has
    none; its config.json holds the pretraining report (held-out accuracy per skill)."""
    folder = base_dir(cfg, seed)
    if not (folder / "model.npz").is_file():
        if progress:
            print(f"pretraining the base of seed {seed} on '{cfg.source}' ({cfg.base_steps} steps) into {folder}")
        pretrain_base(cfg, seed)
    return folder


def base_jobs(cfg) -> dict:
    """The jobs that pretrain the bases not in the cache yet, keyed ("base", seed)."""
    missing = [s for s in cfg.seeds if not (base_dir(cfg, s) / "model.npz").is_file()]
    describe = lambda report: ", ".join(f"{k.split('_', 1)[1]} {v:.3f}" for k, v in report.items()
                                        if k.startswith("accuracy_")) or f"val_loss {report.get('val_loss', 0):.3f}"
    return {("base", s): Job(f"base seed {s} pretrained ({cfg.base_steps} steps)", pretrain_base, (cfg, s),
                             describe=describe) for s in missing}
