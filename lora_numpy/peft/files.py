"""Floor 6: PEFT's adapter files, ``adapter_config.json`` + ``adapter_model.safetensors``.

On disk a key is the parameter's path in the model under PEFT's prefix ``base_model.model.``,
with the adapter name taken out (the folder says which adapter it is):

    in memory                                        on disk
    blocks.0.attn.q_proj.lora_A.default.weight       base_model.model.blocks.0.attn.q_proj.lora_A.weight
    blocks.0.attn.q_proj.lora_magnitude_vector.default.weight  ...q_proj.lora_magnitude_vector
    wte.lora_embedding_A.default                     base_model.model.wte.lora_embedding_A
    score.weight (modules_to_save)                   base_model.model.score.weight

safetensors is a plain header plus raw little-endian arrays: loading it runs no code (a pickle
could), which is why PEFT and Hugging Face moved to it. An adapter folder is written whole
(``io.atomic_directory``) and checked on load before any model is touched.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from .. import backend
from ..io import load_json, recover_directory, save_json

PREFIX = "base_model.model."
CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
ADAPTER_CONTAINERS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def to_peft_key(name: str, adapter: str) -> str | None:
    """In-memory parameter path -> key on disk; None for a parameter of another adapter."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ADAPTER_CONTAINERS:
            if parts[i + 1] != adapter:
                return None
            parts = parts[:i + 1] + parts[i + 2:]
            if part == "lora_magnitude_vector":  # PEFT saves the magnitude without ".weight"
                parts = parts[:i + 1]
            break
    return PREFIX + ".".join(parts)


def from_peft_key(key: str, adapter: str) -> str:
    """Key on disk -> in-memory parameter path for adapter ``adapter``."""
    if not key.startswith(PREFIX):
        raise ValueError(f"key {key!r} does not start with PEFT's prefix {PREFIX!r}")
    parts = key[len(PREFIX):].split(".")
    for i, part in enumerate(parts):
        if part in ADAPTER_CONTAINERS:
            tail = ["weight"] if part == "lora_magnitude_vector" else parts[i + 1:]
            return ".".join(parts[:i + 1] + [adapter] + tail)
    return ".".join(parts)


def check_finite(arrays: dict, where: str) -> None:
    broken = [k for k, a in arrays.items() if not bool(np.isfinite(backend.to_numpy(a)).all())]
    if broken:
        raise ValueError(f"{where}: arrays {broken} hold NaN or inf")


def write_adapter(folder: Path, config: dict, arrays: dict) -> None:
    """One adapter's two files into ``folder`` (a temporary folder being written whole)."""
    host = {k: np.ascontiguousarray(backend.to_numpy(a)) for k, a in arrays.items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(host, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})  # PEFT's metadata
    save_json(folder / CONFIG_NAME, config)


def read_adapter(folder) -> tuple:
    """(config dict, {key: array}) from an adapter folder; clear errors naming the file."""
    folder = recover_directory(Path(folder))
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"no {path.name} in {folder}: an adapter folder holds "
                                    f"{CONFIG_NAME} and {WEIGHTS_NAME} (PEFT's format)")
    try:
        config = load_json(config_path)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_path} is not valid JSON ({err}): truncated or not an adapter config?") from None
    try:
        arrays = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{weights_path} is not a valid safetensors file ({err}): truncated, "
                         "or not an adapter?") from None
    check_finite(arrays, f"{weights_path}")
    return config, arrays
