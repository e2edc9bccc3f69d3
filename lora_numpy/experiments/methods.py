"""Floor 8: the fine-tuning methods the experiments compare, one registry entry each.

A method says how to turn a fresh copy of the base model into the model it trains, which
learning rates the fair protocol tries for it, and, if it needs one, its own optimizer. A new
method is one more entry:

    full     every weight trains
    lora     LoRA on every Linear but the head (Hu et al. 2021)
    pissa    LoRA initialised from the top singular directions of W (Meng et al. 2024)
    dora     LoRA plus a trained magnitude per output row (Liu et al. 2024): use_dora=True
    loraplus LoRA whose B factors learn LORAPLUS_LR_RATIO times faster than A (Hayou et al. 2024)
    qlora    LoRA on a base whose Linear weights are stored in 4-bit NF4 (Dettmers et al. 2023)
    qpissa   PiSSA on the float weights first, then the residual stored in 4 bits (PiSSA §5.3)
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from ..nn import Linear4bit, quantize_linears
from ..optim import AdamW
from ..peft import LoraConfig, create_loraplus_optimizer, get_peft_model


@dataclass(frozen=True)
class Method:
    name: str
    build: Callable         # (base_model, lora: LoraConfig, seed) -> the model to train
    lr_grid: tuple          # learning rates tried on the validation split (3 to 5 values)
    has_adapter: bool       # an adapter that ``disable_adapter()`` can switch off
    make_optimizer: Callable | None = None  # (model, lr, weight_decay) -> optimizer; None: train's AdamW

    def optimizer(self, model, config):
        """The optimizer ``train`` should use for ``model`` under TrainConfig ``config`` (None:
        train's own AdamW). Built at config.lr: train's schedule scales each group's lr from there."""
        if self.make_optimizer is None:
            return None
        return self.make_optimizer(model, config.lr, config.weight_decay)


def _full(model, lora: LoraConfig, seed: int):
    return model


def _adapter(**changes):
    def build(model, lora: LoraConfig, seed: int):
        return get_peft_model(model, replace(lora, **changes), seed=seed)
    return build


def _qlora(model, lora: LoraConfig, seed: int):
    """Quantize the frozen Linears to 4 bits, then add LoRA on top (QLoRA's order)."""
    return get_peft_model(quantize_linears(model), replace(lora, init_lora_weights=True), seed=seed)


def _qpissa(model, lora: LoraConfig, seed: int):
    """PiSSA on the float weights first (its SVD needs W itself), then quantize what stays
    frozen, the residual W_res = W - s·B A; the adapter's factors stay in float."""
    return quantize_linears(get_peft_model(model, replace(lora, init_lora_weights="pissa"), seed=seed))


# LoRA+'s ratio eta_B / eta_A: the paper's recommendation of about 2^4, PEFT's documented example.
LORAPLUS_LR_RATIO = 16


def _loraplus_optimizer(model, lr: float, weight_decay: float):
    """PEFT's four LoRA+ parameter groups under AdamW: A (and other matrices) at lr, B at lr·ratio."""
    return create_loraplus_optimizer(model, AdamW, lr, LORAPLUS_LR_RATIO, loraplus_weight_decay=weight_decay)


def count_parameters(model) -> int:
    """All the weights a model has, trainable or not. ``num_parameters()`` counts Parameters;
    a 4-bit layer's weight is packed codes, not a Parameter, so its in·out weights are added
    here (PEFT's count of a 4-bit model does the same)."""
    quantized = sum(m.in_features * m.out_features for _, m in model.named_modules() if isinstance(m, Linear4bit))
    return model.num_parameters() + quantized


# One grid for all, four values a factor ~3 apart. Every value is run in full on every base, so
# the grid is most of the main job's time: 3e-4 left it when the runs grew from 400 to 600 steps
# (it had scored far below the best for every method at 400). A choice on either edge, or next to
# a rate that fails, is flagged in the output. LoRA+ uses the grid as the base rate (A's); its B
# factors run LORAPLUS_LR_RATIO times higher.
LR_GRID = (1e-3, 3e-3, 1e-2, 3e-2)
METHODS = {
    "full": Method("full", _full, LR_GRID, has_adapter=False),
    "lora": Method("lora", _adapter(init_lora_weights=True), LR_GRID, has_adapter=True),
    "pissa": Method("pissa", _adapter(init_lora_weights="pissa"), LR_GRID, has_adapter=True),
    "dora": Method("dora", _adapter(init_lora_weights=True, use_dora=True), LR_GRID, has_adapter=True),
    "loraplus": Method("loraplus", _adapter(init_lora_weights=True), LR_GRID, has_adapter=True,
                       make_optimizer=_loraplus_optimizer),
    "qlora": Method("qlora", _qlora, LR_GRID, has_adapter=True),
    "qpissa": Method("qpissa", _qpissa, LR_GRID, has_adapter=True),
}
# What ``compare`` runs unless told otherwise (the default job's ~3-minute budget); the others
# run with ``--methods``.
DEFAULT_METHODS = ("full", "lora", "pissa")
