"""Floor 6: ``get_peft_model`` and ``PeftModel``: adapters on a whole model, PEFT's API.

``get_peft_model`` freezes every parameter, then swaps each targeted ``Linear`` (``Embedding``)
for a ``LoraLinear`` (``LoraEmbedding``) wrapping it. The math of one adapted layer lives in
that layer; ``PeftModel`` only loops over the layers and reads and writes PEFT's files. A model
may hold many named adapters; one is active, and a mixed batch can route each row through its
own (``model(idx, adapter_names=[...])``).
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

from .. import backend
from ..io import atomic_directory
from ..nn import Module, dequantize_linears
from .config import LoraConfig, pissa_niter
from .files import ADAPTER_CONTAINERS, check_finite, from_peft_key, read_adapter, to_peft_key, write_adapter
from .targets import (check_adapter_name, extra_trainable, find_targets, lora_class, matches,
                      planned_shapes)
from .tuner import BASE, LoraLayer
from .weighted import COMBINATIONS, combine_factors

def _read_checked(directory, adapter_name: str, model: Module) -> tuple:
    """Config and arrays of an adapter folder, checked against ``model`` before it changes."""
    raw, arrays = read_adapter(directory)
    config = LoraConfig.from_dict(raw, f"{Path(directory) / 'adapter_config.json'}")
    expected = planned_shapes(model, config, adapter_name)
    missing, unexpected = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
    wrong = [f"{k}: file {arrays[k].shape} vs model {expected[k]}"
             for k in expected if k in arrays and tuple(arrays[k].shape) != tuple(expected[k])]
    if missing or unexpected or wrong:
        raise ValueError(f"adapter in {directory} does not fit this model:\n  missing: {missing}\n"
                         f"  unexpected: {unexpected}\n  shape mismatches: {wrong}")
    return config, arrays


def get_peft_model(model: Module, config: LoraConfig, adapter_name: str = "default",
                   seed: int = 0) -> "PeftModel":
    """Wrap ``model`` (in place) with LoRA adapter ``adapter_name``; ``seed`` draws the init."""
    if isinstance(model, PeftModel) or any(isinstance(m, LoraLayer) for _, m in model.named_modules()):
        raise ValueError("this model already holds LoRA layers: add another adapter with "
                         "PeftModel.add_adapter(name, config), or merge_and_unload() first")
    check_adapter_name(adapter_name)
    planned_shapes(model, config, adapter_name)  # every check before anything changes
    if config.modules_to_save and not any(matches(n, config.modules_to_save)
                                          for n, _ in model.named_modules() if n):
        raise ValueError(f"modules_to_save={config.modules_to_save!r} matched no module")
    model.requires_grad_(False)
    peft = PeftModel(model, config, adapter_name)
    peft._inject(adapter_name, config, np.random.default_rng(seed))
    peft.set_adapter(adapter_name)
    return peft


class PeftModel(Module):
    """The base model with named adapters; calls, ``generate`` and attributes pass through."""

    def __init__(self, base_model: Module, peft_config: LoraConfig, adapter_name: str = "default"):
        self.base_model = base_model
        self.peft_config = {adapter_name: peft_config}  # adapter name -> its LoraConfig, as PEFT
        self._active = adapter_name

    def __getattr__(self, name):  # only reached when normal lookup fails
        if name in ("base_model", "peft_config", "_active"):
            raise AttributeError(name)
        return getattr(self.base_model, name)

    def forward(self, *args, adapter_names=None, **kwargs):
        """As the base model; ``adapter_names`` (one per batch row, ``"__base__"`` for none)
        routes each row through its own adapter."""
        if adapter_names is None:
            return self.base_model(*args, **kwargs)
        batch = len(args[0]) if args else None
        if batch is not None and len(adapter_names) != batch:
            raise ValueError(f"adapter_names has {len(adapter_names)} entries for a batch of {batch} rows")
        unknown = sorted({n for n in adapter_names if n != BASE and n not in self.peft_config})
        if unknown:
            raise ValueError(f"adapter_names holds unknown adapters {unknown}; loaded: {list(self.peft_config)}")
        if any(layer.merged for _, layer in self.lora_layers()):
            raise ValueError("cannot route a mixed batch while adapters are merged: call unmerge_adapter() first")
        layers = [layer for _, layer in self.lora_layers()]
        for layer in layers:
            layer.batch_adapter_names = list(adapter_names)
        try:
            return self.base_model(*args, **kwargs)
        finally:
            for layer in layers:
                layer.batch_adapter_names = None

    def lora_layers(self) -> list:
        """(path, layer) for every adapted layer."""
        return [(n, m) for n, m in self.base_model.named_modules() if isinstance(m, LoraLayer)]

    # ---- adapters -------------------------------------------------------------------------
    @property
    def active_adapter(self) -> str | None:
        return self._active

    @property
    def active_peft_config(self) -> LoraConfig:
        return self.peft_config[self._active]

    def _inject(self, adapter_name: str, config: LoraConfig, rng) -> None:
        """Add adapter ``adapter_name`` to every target: a new wrapper, or one more entry in an
        existing one."""
        for path, module in find_targets(self.base_model, config.target_modules):
            if isinstance(module, LoraLayer):
                module.update_layer(adapter_name, config, rng)
                module.set_adapter(module.active_adapter)  # the new adapter starts frozen
            else:
                parent, _, child = path.rpartition(".")
                setattr(self.base_model.get_submodule(parent), child,
                        lora_class(module)(module, config, rng, adapter_name))

    def add_adapter(self, adapter_name: str, peft_config: LoraConfig, seed: int = 0) -> None:
        """A new adapter beside the others, inactive and frozen until ``set_adapter``."""
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter with name '{adapter_name}' already exists.")
        if peft_config.modules_to_save or (peft_config.bias != "none" and any(
                c.bias != "none" for c in self.peft_config.values())):
            raise ValueError("modules_to_save, and bias != 'none' on more than one adapter, would be "
                             "shared between adapters here; give this adapter modules_to_save=None "
                             "and bias='none'")
        planned_shapes(self.base_model, peft_config, adapter_name)  # checks before changes
        self._inject(adapter_name, peft_config, np.random.default_rng(seed))
        self.peft_config[adapter_name] = peft_config
        for _, layer in self.lora_layers():
            layer.set_adapter(self._active)

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the active one: it alone trains and runs in forward."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} not found.")
        config = self.peft_config[adapter_name]
        for _, layer in self.lora_layers():
            if layer.merged:
                warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.")
                layer.unmerge()
            layer.set_adapter(adapter_name)
        targets = [n for n, _ in find_targets(self.base_model, config.target_modules)]
        for p in extra_trainable(self.base_model, config, targets).values():
            p.requires_grad = True
        self._active = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        """Forget an adapter. If it was active, the first remaining name (sorted) becomes active."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        merged = [n for n, layer in self.lora_layers() if adapter_name in layer.merged_adapters]
        if merged:
            raise ValueError(f"adapter {adapter_name!r} is merged into {merged}; unmerge_adapter() first")
        del self.peft_config[adapter_name]
        for _, layer in self.lora_layers():
            layer.delete_adapter(adapter_name)
        if self._active == adapter_name:
            remaining = sorted(self.peft_config)
            self._active = remaining[0] if remaining else None
            if remaining:
                warnings.warn(f"Adapter {adapter_name} was active which is now deleted. Setting active "
                              f"adapter to {remaining[0]}.")
                self.set_adapter(remaining[0])

    @contextlib.contextmanager
    def disable_adapter(self):
        """Run as the base model (for PiSSA: the residual model W_res) inside the block."""
        layers = [layer for _, layer in self.lora_layers()]
        merged = [list(layer.merged_adapters) for layer in layers]
        for layer in layers:
            layer.unmerge()
            layer.disable_adapters = True
        try:
            yield
        finally:
            for layer, names in zip(layers, merged):
                layer.disable_adapters = False
                layer.merge(names)

    def add_weighted_adapter(self, adapters: list, weights: list, adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None,
                             svd_clamp: float | None = None) -> None:
        """A new adapter from existing ones (PEFT's rules, weighted.py): rank Σ r_i for "cat",
        the common r for "linear", ``svd_rank`` or max r_i for "svd"; its lora_alpha equals its
        rank, so its scale is 1 (√r with rsLoRA, as in PEFT). A single adapter always combines
        linearly. An existing ``adapter_name`` leaves everything as it is (PEFT returns too)."""
        if adapter_name in self.peft_config:
            return
        missing = [a for a in adapters if a not in self.peft_config]
        if missing:
            raise ValueError(f"Adapter {missing[0]} does not exist")
        if len(weights) != len(adapters):
            raise ValueError(f"{len(adapters)} adapters but {len(weights)} weights")
        combination_type = "linear" if len(adapters) == 1 else combination_type
        ranks = [self.peft_config[a].r for a in adapters]
        if combination_type == "linear":
            if len(set(ranks)) != 1:
                raise ValueError(f"All adapters must have the same r value when using combination_type "
                                 f"linear (got ranks {ranks}); use 'cat' or 'svd'")
            new_rank = ranks[0]
        elif combination_type == "cat":
            new_rank = sum(ranks)
        elif combination_type == "svd":
            new_rank = svd_rank or max(ranks)
        else:
            raise ValueError(f"combination_type={combination_type!r}; choose one of {COMBINATIONS}")
        targets = [self.peft_config[a].target_modules for a in adapters]
        if len({type(t) for t in targets}) > 1:
            raise ValueError("all adapters' target_modules must be of one type (names, or one regex)")
        if all(t == targets[0] for t in targets):  # "all-linear" too, which PEFT expands to names first
            new_targets = targets[0]
        elif isinstance(targets[0], str):
            new_targets = "|".join(f"({t})" for t in targets)
        else:
            new_targets = tuple(sorted(set().union(*targets)))
        config = replace(self.peft_config[adapters[0]], r=new_rank, lora_alpha=new_rank,
                         target_modules=new_targets, modules_to_save=None, bias="none")
        self.add_adapter(adapter_name, config)
        for _, layer in self.lora_layers():
            if adapter_name not in layer.r:
                continue
            held = [(a, w) for a, w in zip(adapters, weights) if a in layer.r]
            if not held:
                raise ValueError("No matching LoRAs found.")
            A, B = combine_factors(combination_type, [(*layer.factors(a), layer.scaling[a]) for a, _ in held],
                                   [w for _, w in held], new_rank, svd_clamp)
            layer.set_factors(adapter_name, A, B)

    # ---- counting, merging, rank ------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple:
        """(trainable, all) parameter counts, adapters included in both."""
        return self.num_parameters(trainable_only=True), self.num_parameters()

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,} || all params: {total:,} || "
              f"trainable%: {100 * trainable / total:.4f}")

    def merge_adapter(self) -> None:
        for _, layer in self.lora_layers():
            layer.merge()

    def unmerge_adapter(self) -> None:
        for _, layer in self.lora_layers():
            layer.unmerge()

    def merge_and_unload(self, dequantize: bool = False) -> Module:
        """Fold the active adapter into every base weight and return the plain base model.
        A 4-bit base (QLoRA) refuses the merge unless ``dequantize=True``: then every 4-bit layer
        becomes a float Linear first, and the merged model is float (not 4-bit) from then on."""
        if dequantize:
            dequantize_linears(self.base_model)
        for name, layer in self.lora_layers():
            layer.merge()
            parent, _, child = name.rpartition(".")
            setattr(self.base_model.get_submodule(parent), child, layer.base_layer)
        return self.base_model

    def adjust_rank(self, k: int) -> None:
        """Truncate the active adapter to rank k in every layer by the SVD of its ΔW
        (Eckart–Young). lora_alpha stays, so the scale becomes alpha/k."""
        merged = [name for name, layer in self.lora_layers() if layer.merged]
        if merged:
            raise RuntimeError(f"{merged} are merged; call unmerge_adapter() before adjust_rank()")
        layers = [layer for _, layer in self.lora_layers() if self._active in layer.r]
        bad = [layer.r[self._active] for layer in layers if not 1 <= k <= layer.r[self._active]]
        if bad:
            raise ValueError(f"can only truncate to a rank in [1, {min(bad)}], got {k}")
        for layer in layers:
            layer.truncate(self._active, k)
        self.peft_config[self._active] = replace(self.active_peft_config, r=k)

    # ---- files ----------------------------------------------------------------------------
    def adapter_state_dict(self, adapter_name: str | None = None) -> dict:
        """{key on disk (PEFT's): array} of one adapter: its factors, plus the biases and
        modules_to_save its config trains."""
        name = self._active if adapter_name is None else adapter_name
        config = self.peft_config[name]
        targets = [n for n, _ in find_targets(self.base_model, config.target_modules)]
        arrays = {}
        for n, p in self.base_model.named_parameters():
            key = to_peft_key(n, name)  # None for another adapter's factor
            if key and any(part in ADAPTER_CONTAINERS for part in n.split(".")):
                arrays[key] = p.data
        arrays.update({to_peft_key(n, name): p.data for n, p in
                       extra_trainable(self.base_model, config, targets).items()})
        return arrays

    def save_pretrained(self, directory, selected_adapters=None, convert_pissa_to_lora: bool = False) -> Path:
        """Write PEFT's files, all adapters as one unit: ``adapter_config.json`` and
        ``adapter_model.safetensors`` in ``directory`` for "default", in ``directory/<name>``
        for any other adapter.

        ``convert_pissa_to_lora``: a PiSSA adapter only fits the residual base W_res. Saved
        converted (``LoraLinear.pissa_to_lora_factors``), it fits the original W0 as a plain
        LoRA adapter of rank r + r0 (2r unless the rank was adjusted), with lora_alpha chosen
        so that the scale is unchanged (2·alpha, or √2·alpha with rsLoRA), as PEFT does.
        """
        if not self.lora_layers():
            raise ValueError(f"this model holds no LoRA layers (merge_and_unload() folded them into "
                             f"the base?): refusing to write an empty adapter over {directory}")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        saves = {}
        for name in names:
            config, arrays = self.peft_config[name], self.adapter_state_dict(name)
            check_finite(arrays, f"adapter {name!r}, refusing to write {directory}")
            if convert_pissa_to_lora:
                config, arrays = self._pissa_as_lora(name, config, arrays)
            saves[name] = (config, arrays)
        with atomic_directory(directory, marker="adapter_config.json") as tmp:
            for name, (config, arrays) in saves.items():
                write_adapter(tmp if name == "default" else tmp / name, config.to_dict(), arrays)
        return Path(directory)

    def _pissa_as_lora(self, name: str, config: LoraConfig, arrays: dict) -> tuple:
        if pissa_niter(config.init_lora_weights) is None:
            raise ValueError("convert_pissa_to_lora needs a PiSSA adapter, but init_lora_weights="
                             f"{config.init_lora_weights!r}")
        ranks = set()
        for path, layer in self.lora_layers():
            if name in getattr(layer, "pissa_start", {}):
                A, B = layer.pissa_to_lora_factors(name)
                arrays[to_peft_key(f"{path}.lora_A.{name}.weight", name)] = A
                arrays[to_peft_key(f"{path}.lora_B.{name}.weight", name)] = B
                ranks.add(A.shape[0])
        rank = ranks.pop()
        alpha = config.scaling * (np.sqrt(rank) if config.use_rslora else rank)
        return replace(config, r=rank, lora_alpha=float(alpha), init_lora_weights=True), arrays

    def _copy_in(self, adapter_name: str, arrays: dict) -> None:
        params = dict(self.base_model.named_parameters())
        for key, value in arrays.items():
            p = params[from_peft_key(key, adapter_name)]
            p.data[...] = backend.asarray(value, dtype=p.dtype)

    def load_adapter(self, directory, adapter_name: str, seed: int = 0) -> None:
        """Load an adapter folder as another named adapter: inactive and frozen until
        ``set_adapter(adapter_name)`` makes it the one that runs and trains."""
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter with name '{adapter_name}' already exists.")
        config, arrays = _read_checked(directory, adapter_name, self.base_model)
        self.add_adapter(adapter_name, config, seed)
        self._copy_in(adapter_name, arrays)

    @classmethod
    def from_pretrained(cls, base_model: Module, directory, adapter_name: str = "default",
                        is_trainable: bool = False, seed: int = 0) -> "PeftModel":
        """Load an adapter onto ``base_model``; frozen unless ``is_trainable`` (PEFT's default).
        Every name and shape is checked before the model is touched. A PiSSA adapter saved
        unconverted re-runs the PiSSA initialisation first, as PEFT does: the base weights
        become W_res again, which is what the adapter was trained on."""
        config, arrays = _read_checked(directory, adapter_name, base_model)
        model = get_peft_model(base_model, config, adapter_name, seed)
        model._copy_in(adapter_name, arrays)
        if not is_trainable:
            model.requires_grad_(False)
        return model
