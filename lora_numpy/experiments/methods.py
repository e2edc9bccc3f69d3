"""Floor 8: the fine-tuning methods the experiments compare, one registry entry each.

A method says how to turn a fresh copy of the base model into the model it trains, and which
learning rates the fair protocol tries for it. A new method (DoRA, LoRA+, QLoRA) is one more entry.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from ..peft import LoraConfig, get_peft_model


@dataclass(frozen=True)
class Method:
    name: str
    build: Callable         # (base_model, lora: LoraConfig, seed) -> the model to train
    lr_grid: tuple          # learning rates tried on the validation split (3 to 5 values)
    has_adapter: bool       # an adapter that ``disable_adapter()`` can switch off


def _full(model, lora: LoraConfig, seed: int):
    return model


def _adapter(init_lora_weights):
    def build(model, lora: LoraConfig, seed: int):
        return get_peft_model(model, replace(lora, init_lora_weights=init_lora_weights), seed=seed)
    return build


# One grid for all, a factor ~3 apart. In the default job every method's choice falls inside it;
# a choice on the edge (LoRA in the low-data study) says the grid could grow that way.
LR_GRID = (3e-4, 1e-3, 3e-3, 1e-2)
METHODS = {
    "full": Method("full", _full, LR_GRID, has_adapter=False),
    "lora": Method("lora", _adapter(True), LR_GRID, has_adapter=True),
    "pissa": Method("pissa", _adapter("pissa"), LR_GRID, has_adapter=True),
}
