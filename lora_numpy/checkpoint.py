"""Floor 7 (beside train.py): saving and restoring models and training runs.

A checkpoint folder holds
  model.npz        the state dict (parameter name -> array)
  config.json      what to rebuild: the model class and its GPTConfig, plus the caller's
                   extras (task, tokenizer)
  optimizer.npz    optimizer buffers (only when a training run saves its state)
  train_state.json step, optimizer scalars, generator states, history
A save is one unit: the files are written into a temporary sibling folder that then replaces
the old folder whole (``io.atomic_directory``), so a crash at any moment leaves the old save or
the new one, never a mix; every loader first finishes a swap a crash interrupted
(``io.recover_directory``). Arrays are read with ``allow_pickle=False`` and refused if they hold
NaN or inf (see ``io.py``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import backend
from .io import atomic_directory, load_arrays, load_json, recover_directory, save_arrays, save_json
from .models import GPT, GPTConfig, GPTForSequenceClassification, GPTForTokenClassification
from .nn import Module

CLASSIFIERS = (GPTForSequenceClassification, GPTForTokenClassification)  # a GPT body plus a head


def _check_finite(model: Module) -> None:
    for name, p in model.named_parameters():
        if not bool(backend.xp.isfinite(p.data).all()):
            raise ValueError(f"parameter {name} holds NaN or inf; refusing to overwrite a "
                             "checkpoint with a broken model")


def save_model(directory, model: Module, extra: dict | None = None) -> Path:
    """Write ``model.npz`` and ``config.json`` for a GPT or one of its classifiers.

    The folder is replaced whole (other files in it disappear); a non-empty folder that holds
    no ``config.json`` is refused rather than replaced."""
    _check_finite(model)
    if isinstance(model, CLASSIFIERS):
        meta = {"model": type(model).__name__, "num_labels": model.num_labels,
                "config": model.transformer.config.to_dict()}
    elif isinstance(model, GPT):
        meta = {"model": "GPT", "config": model.config.to_dict()}
    else:
        raise TypeError(f"save_model knows GPT and {', '.join(c.__name__ for c in CLASSIFIERS)}, "
                        f"got {type(model).__name__}")
    with atomic_directory(directory, marker="config.json") as tmp:
        save_arrays(tmp / "model.npz", model.state_dict())
        save_json(tmp / "config.json", {**meta, **(extra or {})})
    return Path(directory)


def _saved_folder(directory, marker: str) -> Path:
    """``directory`` after finishing an interrupted swap; a clear error if it holds no save."""
    directory = recover_directory(directory)
    if not (directory / marker).is_file():
        raise FileNotFoundError(f"{directory} holds no {marker}: not a folder this package "
                                "saved (or the save never completed)")
    return directory


def load_model(directory):
    """Rebuild the model saved by :func:`save_model`; returns (model, config dict)."""
    directory = _saved_folder(directory, "config.json")
    meta = load_json(directory / "config.json")
    if not isinstance(meta, dict) or "model" not in meta or "config" not in meta:
        raise ValueError(f"{directory}/config.json has no 'model' and 'config' entries: "
                         "not a model checkpoint")
    config = GPTConfig(**meta["config"])
    if meta["model"] == "GPT":
        model = GPT(config)
    elif meta["model"] in {c.__name__ for c in CLASSIFIERS}:
        model = next(c for c in CLASSIFIERS if c.__name__ == meta["model"])(config, meta["num_labels"])
    else:
        raise ValueError(f"{directory}/config.json names an unknown model {meta['model']!r}")
    model.load_state_dict(load_arrays(directory / "model.npz"))
    return model, meta


def save_train_state(directory, model, optimizer, data_rng, dropout_rngs, step, history, config):
    """Everything a resumed run needs to continue bit for bit, written as one unit (the folder
    is replaced whole; a non-empty folder without ``train_state.json`` is refused)."""
    _check_finite(model)
    state = optimizer.state_dict()
    with atomic_directory(directory, marker="train_state.json") as tmp:
        save_arrays(tmp / "model.npz", model.state_dict())
        save_arrays(tmp / "optimizer.npz", state["arrays"])
        save_json(tmp / "train_state.json", {
            "step": step, "optimizer": state["scalars"], "train_config": config,
            "data_rng": data_rng.bit_generator.state,
            "dropout_rngs": [g.bit_generator.state for g in dropout_rngs],
            "history": history})
    return Path(directory)


def saved_train_config(directory) -> tuple:
    """(step, training config) of the run saved in ``directory``, read before anything loads."""
    state = load_json(_saved_folder(directory, "train_state.json") / "train_state.json")
    return state["step"], state["train_config"]


def load_train_state(directory, model, optimizer, data_rng, dropout_rngs):
    """Restore what :func:`save_train_state` wrote; returns (step, history)."""
    directory = _saved_folder(directory, "train_state.json")
    state = load_json(directory / "train_state.json")
    if len(state["dropout_rngs"]) != len(dropout_rngs):
        raise ValueError(f"checkpoint has {len(state['dropout_rngs'])} dropout generators, the model "
                         f"{len(dropout_rngs)}: is this the same kind of model?")
    model.load_state_dict(load_arrays(directory / "model.npz"))
    optimizer.load_state_dict({"arrays": load_arrays(directory / "optimizer.npz"),
                               "scalars": state["optimizer"]})
    data_rng.bit_generator.state = state["data_rng"]
    for gen, saved in zip(dropout_rngs, state["dropout_rngs"]):
        gen.bit_generator.state = saved
    return state["step"], state["history"]


def snapshot(model: Module) -> dict:
    """Copies of every parameter array, for checking later what training changed."""
    return {name: np.array(backend.to_numpy(a), copy=True) for name, a in model.state_dict().items()}
