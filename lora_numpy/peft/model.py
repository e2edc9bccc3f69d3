"""Floor 6: ``get_peft_model`` and ``PeftModel``: LoRA applied to a whole model, PEFT's API.

``get_peft_model`` freezes every parameter, then swaps each targeted ``Linear`` for a
``LoraLinear`` wrapping it; only the adapters (plus any biases and ``modules_to_save`` the
config names) train. An adapter folder holds ``adapter_config.json`` and ``adapter_model.npz``
with only the trainable arrays, keyed by their path in the base model (``blocks.0.attn.q_proj.
lora_A``): kilobytes, against megabytes for the model.
"""
from __future__ import annotations

import contextlib
import copy
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np

from .. import backend
from ..io import atomic_directory, load_arrays, load_json, recover_directory, save_arrays, save_json
from ..nn import Linear, Module, Parameter
from .config import LoraConfig, pissa_niter
from .layer import LoraLinear, check_rank
from .svd import split_factors, truncate_product

HEAD_NAMES = ("lm_head", "score")  # output layers that "all-linear" leaves alone, as PEFT does


def _matches(name: str, targets) -> bool:
    """PEFT's rule: an entry matches a module whose full name equals it or ends with
    ``"." + entry``; a string is a regular expression over the full name."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def find_targets(model: Module, target_modules) -> list:
    """(name, Linear) for every module ``target_modules`` selects; clear errors otherwise."""
    linears = [name for name, m in model.named_modules() if isinstance(m, Linear)]
    if target_modules == "all-linear":
        return [(n, model.get_submodule(n)) for n in linears if n.rpartition(".")[2] not in HEAD_NAMES]
    chosen = []
    for name, module in model.named_modules():
        if name and _matches(name, target_modules):
            if not isinstance(module, Linear):
                raise ValueError(f"target {name!r} is a {type(module).__name__}; LoRA here adapts "
                                 f"Linear layers only: {linears}")
            chosen.append((name, module))
    if not chosen:
        raise ValueError(f"target_modules={target_modules!r} matched no module. Linear layers in "
                         f"this model: {linears}")
    return chosen


def get_peft_model(model: Module, config: LoraConfig, seed: int = 0) -> "PeftModel":
    """Wrap ``model`` (in place) with LoRA adapters; ``seed`` draws their random init."""
    targets = find_targets(model, config.target_modules)
    for name, linear in targets:  # every check before anything changes: a refusal leaves no trace
        check_rank(config.r, linear, name)
    if config.modules_to_save:
        saved = [n for n, _ in model.named_modules() if n and _matches(n, config.modules_to_save)]
        if not saved:
            raise ValueError(f"modules_to_save={config.modules_to_save!r} matched no module")
    model.requires_grad_(False)
    rng = np.random.default_rng(seed)
    for name, linear in targets:
        parent, _, child = name.rpartition(".")
        layer = LoraLinear(linear, config, rng)
        setattr(model.get_submodule(parent), child, layer)
        if config.bias == "lora_only" and linear.bias is not None:
            linear.bias.requires_grad = True
    for name, p in model.named_parameters():
        if config.bias == "all" and name.endswith("bias"):
            p.requires_grad = True
    for name, module in model.named_modules():
        if name and config.modules_to_save and _matches(name, config.modules_to_save):
            module.requires_grad_(True)
    return PeftModel(model, config)


class PeftModel(Module):
    """The base model with adapters; calls, ``generate`` and attributes pass through to it."""

    def __init__(self, base_model: Module, peft_config: LoraConfig):
        self.base_model = base_model
        self.peft_config = peft_config

    def __getattr__(self, name):  # only reached when normal lookup fails
        if name == "base_model":
            raise AttributeError(name)
        return getattr(self.base_model, name)

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def lora_layers(self) -> list:
        return [(n, m) for n, m in self.base_model.named_modules() if isinstance(m, LoraLinear)]

    # ---- counting -----------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple:
        """(trainable, all) parameter counts, adapters included in both."""
        return self.num_parameters(trainable_only=True), self.num_parameters()

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,} || all params: {total:,} || "
              f"trainable%: {100 * trainable / total:.4f}")

    # ---- merging ------------------------------------------------------------------------
    def merge_adapter(self) -> None:
        for _, layer in self.lora_layers():
            layer.merge()

    def unmerge_adapter(self) -> None:
        for _, layer in self.lora_layers():
            layer.unmerge()

    def merge_and_unload(self) -> Module:
        """Fold every ΔW into its base weight and return the plain base model (no LoRA left)."""
        for name, layer in self.lora_layers():
            layer.merge()
            parent, _, child = name.rpartition(".")
            setattr(self.base_model.get_submodule(parent), child, layer.base_layer)
        return self.base_model

    @contextlib.contextmanager
    def disable_adapter(self):
        """Run as the base model (for PiSSA: the residual model W_res) inside the block."""
        layers = [layer for _, layer in self.lora_layers()]
        merged = [layer.merged for layer in layers]
        for layer in layers:
            layer.unmerge()
            layer.disabled = True
        try:
            yield
        finally:
            for layer, was_merged in zip(layers, merged):
                layer.disabled = False
                if was_merged:
                    layer.merge()

    # ---- rank reduction -------------------------------------------------------------------
    def adjust_rank(self, k: int) -> None:
        """Truncate every adapter to rank k by the SVD of its ΔW (Eckart–Young: the best
        rank-k update in Frobenius norm). lora_alpha stays, so the scale becomes alpha/k."""
        merged = [name for name, layer in self.lora_layers() if layer.merged]
        if merged:
            raise RuntimeError(f"{merged} are merged; call unmerge_adapter() before adjust_rank()")
        new_config = replace(self.peft_config, r=k)
        for name, layer in self.lora_layers():
            U, S, Vt = truncate_product(layer.lora_B.data, layer.lora_A.data, k)
            Bk, Ak = split_factors(U, S * layer.scaling, Vt, new_config.scaling)
            layer.lora_A = Parameter(Ak.astype(layer.lora_A.dtype))
            layer.lora_B = Parameter(Bk.astype(layer.lora_B.dtype))
            layer.r, layer.scaling = k, new_config.scaling
        self.peft_config = new_config

    # ---- files ----------------------------------------------------------------------------
    def adapter_state_dict(self) -> dict:
        """Every trainable array (adapters, trained biases, modules_to_save), by base-model path."""
        return {name: p.data for name, p in self.base_model.named_parameters() if p.requires_grad}

    def save_pretrained(self, directory, convert_pissa_to_lora: bool = False) -> Path:
        """Write ``adapter_config.json`` and ``adapter_model.npz`` into ``directory``.

        ``convert_pissa_to_lora``: a PiSSA adapter only fits the residual base W_res. Saved
        converted, it fits the original W0 as a plain LoRA adapter of rank k + r0 (2r unless
        the rank was adjusted): with the trained factors (A', B') at scale s' and the initial
        ones (A0, B0) at scale s0,
            ΔW = s'B'A' − s0 B0 A0 = s' · [B' | −(s0/s') B0] [A' ; A0],
        and lora_alpha is chosen so that the new rank gives the scale s' (for r' = r: 2·alpha,
        or √2·alpha with rsLoRA), as PEFT does.
        """
        config, arrays = self.peft_config, self.adapter_state_dict()
        broken = [name for name, a in arrays.items() if not bool(backend.xp.isfinite(a).all())]
        if broken:
            raise ValueError(f"adapter arrays {broken} hold NaN or inf; refusing to overwrite "
                             f"{directory} with a broken adapter")
        if convert_pissa_to_lora:
            if pissa_niter(config.init_lora_weights) is None:
                raise ValueError("convert_pissa_to_lora needs a PiSSA adapter, but init_lora_weights="
                                 f"{config.init_lora_weights!r}")
            for name, layer in self.lora_layers():
                arrays[f"{name}.lora_A"] = backend.xp.concatenate([layer.lora_A.data, layer.initial_A], axis=0)
                ratio = layer.initial_scaling / layer.scaling
                arrays[f"{name}.lora_B"] = backend.xp.concatenate([layer.lora_B.data, -ratio * layer.initial_B], axis=1)
            rank = config.r + self.lora_layers()[0][1].initial_A.shape[0]
            alpha = config.scaling * (math.sqrt(rank) if config.use_rslora else rank)
            config = replace(config, r=rank, lora_alpha=alpha, init_lora_weights=True)
        with atomic_directory(directory, marker="adapter_config.json") as tmp:  # one unit
            save_arrays(tmp / "adapter_model.npz", arrays)
            save_json(tmp / "adapter_config.json", config.to_dict())
        return Path(directory)

    @classmethod
    def from_pretrained(cls, base_model: Module, directory, seed: int = 0) -> "PeftModel":
        """Load an adapter onto ``base_model``. Every name and shape is checked against the
        base model before it is touched, so a mismatched adapter leaves it as it was.
        A PiSSA adapter saved unconverted re-runs the PiSSA initialisation first, as PEFT does:
        the base weights become W_res again, which is what the adapter was trained on."""
        directory = recover_directory(directory)  # finish a swap a crash interrupted
        config = LoraConfig.from_dict(load_json(directory / "adapter_config.json"))
        arrays = load_arrays(directory / "adapter_model.npz")
        # What this config makes trainable on this model, found by wrapping a throwaway copy
        # with the one mechanism that decides it, so the check can never disagree with it.
        expected = {k: v.shape for k, v in
                    get_peft_model(copy.deepcopy(base_model), config, seed).adapter_state_dict().items()}
        missing = sorted(set(expected) - set(arrays))
        unexpected = sorted(set(arrays) - set(expected))
        wrong = [f"{k}: file {arrays[k].shape} vs model {expected[k]}"
                 for k in expected if k in arrays and arrays[k].shape != expected[k]]
        if missing or unexpected or wrong:
            raise ValueError(f"adapter in {directory} does not fit this model:\n  missing: {missing}\n"
                             f"  unexpected: {unexpected}\n  shape mismatches: {wrong}")
        model = get_peft_model(base_model, config, seed)
        params = dict(base_model.named_parameters())
        for name, value in arrays.items():
            params[name].data[...] = backend.asarray(value, dtype=params[name].dtype)
        return model

