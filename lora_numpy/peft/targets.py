"""Floor 6: which layers an adapter goes on, and what it adds there (PEFT's matching rules).

``find_targets`` resolves ``target_modules``; ``planned_shapes`` lists, without changing anything,
every array an adapter config would add to a model under PEFT's on-disk keys, so that a save or
a load can be checked against the model before it is touched.
"""
from __future__ import annotations

import re

from ..nn import Embedding, Linear, Module
from ..nn.quantized import HEAD_NAMES
from .config import LoraConfig
from .embedding import LoraEmbedding
from .files import ADAPTER_CONTAINERS, to_peft_key
from .layer import LoraLinear
from .tuner import BASE, LoraLayer

LAYER_FOR = {Linear: LoraLinear, Embedding: LoraEmbedding}


def lora_class(module: Module):
    """The LoRA layer that wraps ``module`` (a ``Linear4bit`` is a ``Linear``: that is QLoRA), or None."""
    return next((cls for kind, cls in LAYER_FOR.items() if isinstance(module, kind)), None)


def matches(name: str, targets) -> bool:
    """PEFT's rule: an entry matches a module whose full name equals it or ends with
    ``"." + entry``; a string is a regular expression over the full name."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _outer_modules(model: Module):
    """(name, module) for every module not inside a LoRA layer (whose base layer and factors
    are never targets themselves)."""
    inside = None
    for name, module in model.named_modules():
        if inside is not None and name.startswith(inside):
            continue
        inside = name + "." if isinstance(module, LoraLayer) else inside
        yield name, module


def _adaptable(model: Module) -> list:
    """(name, module) for every Linear/Embedding that LoRA may wrap or already wraps."""
    return [(n, m) for n, m in _outer_modules(model) if isinstance(m, LoraLayer) or lora_class(m) is not None]


def find_targets(model: Module, target_modules) -> list:
    """(name, module) for every module ``target_modules`` selects; clear errors otherwise."""
    adaptable = _adaptable(model)
    names = [n for n, _ in adaptable]
    if target_modules == "all-linear":
        return [(n, m) for n, m in adaptable if n.rpartition(".")[2] not in HEAD_NAMES
                and isinstance(getattr(m, "base_layer", m), Linear)]
    by_name, chosen = dict(adaptable), []
    for name, module in _outer_modules(model):
        if name and matches(name, target_modules):
            if name not in by_name:
                raise ValueError(f"target {name!r} is a {type(module).__name__}; LoRA here adapts "
                                 f"Linear and Embedding layers only: {names}")
            chosen.append((name, module))
    if not chosen:
        raise ValueError(f"target_modules={target_modules!r} matched no module. Linear and "
                         f"Embedding layers in this model: {names}")
    return chosen


def check_adapter_name(name) -> None:
    if not isinstance(name, str) or not name or "." in name or name == BASE:
        raise ValueError(f"adapter name {name!r} must be a non-empty string without '.', and not "
                         f"{BASE!r} (which stands for the base model)")


def planned_shapes(model: Module, config: LoraConfig, adapter: str) -> dict:
    """{key on disk: shape} of what ``config`` adds to ``model`` under ``adapter``: the layers'
    own shapes, plus the biases and modules_to_save it trains. Nothing is changed."""
    targets = find_targets(model, config.target_modules)
    shapes = {}
    for path, module in targets:
        base = getattr(module, "base_layer", module)
        for suffix, shape in lora_class(base).adapter_shapes(base, config).items():
            shapes[to_peft_key(f"{path}.{suffix.format(name=adapter)}", adapter)] = shape
    for name, p in extra_trainable(model, config, [n for n, _ in targets]).items():
        shapes[to_peft_key(name, adapter)] = p.shape
    return shapes


def extra_trainable(model: Module, config: LoraConfig, target_paths) -> dict:
    """The non-LoRA parameters ``config`` trains (biases, modules_to_save), by the names they
    have once the targets are wrapped (a target's own bias sits under ``base_layer``)."""
    wrapped, chosen = set(target_paths), {}
    for name, p in model.named_parameters():
        module_path, _, leaf = name.rpartition(".")
        parts = module_path.split(".")
        if any(part in ADAPTER_CONTAINERS for part in parts):
            continue
        if module_path in wrapped:
            module_path = f"{module_path}.base_layer"
        full = f"{module_path}.{leaf}" if module_path else leaf
        in_target = module_path.endswith("base_layer") and module_path[:-len(".base_layer")] in wrapped
        prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)] if module_path else []
        if ((leaf == "bias" and (config.bias == "all" or (config.bias == "lora_only" and in_target)))
                or (config.modules_to_save and any(matches(pre, config.modules_to_save) for pre in prefixes))):
            chosen[full] = p
    return chosen
