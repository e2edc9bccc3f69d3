"""Floor 6: LoRA+ (Hayou, Ghosh and Yu 2024), PEFT's ``create_loraplus_optimizer``.

With B = 0 at the start, A and B do not play symmetric roles: the paper shows that for wide
layers a single learning rate is inefficient, and that B should learn faster than A, by a ratio
``loraplus_lr_ratio`` = η_B / η_A of about 2^4. PEFT's parameter groups, in its order:

    group            holds                                         lr                 weight decay
    A                lora_A and every other 2-D trainable          lr                 loraplus_weight_decay
    embedding        parameters of a LoRA embedding layer          loraplus_lr_embedding  loraplus_weight_decay
    B                lora_B, and 1-D parameters outside LayerNorms  lr · ratio         loraplus_weight_decay
                     and without "bias" in their name (DoRA's m)
    B, no decay      biases and LayerNorm parameters               lr · ratio         0
"""
from __future__ import annotations

from ..nn import LayerNorm
from .embedding import LoraEmbedding


def create_loraplus_optimizer(model, optimizer_cls, lr: float, loraplus_lr_ratio: float,
                              loraplus_lr_embedding: float = 1e-6, **kwargs):
    """``optimizer_cls`` (``AdamW``, say) over PEFT's four LoRA+ groups; ``kwargs`` go to it,
    except ``loraplus_weight_decay`` (default 0.0), the weight decay of the decaying groups."""
    layernorm_params = {id(p) for _, m in model.named_modules() if isinstance(m, LayerNorm)
                        for p in m.parameters()}
    embedding_params = {id(p) for _, m in model.named_modules() if isinstance(m, LoraEmbedding)
                        for name in m.adapter_layer_names for p in getattr(m, name).values()}
    groups = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in embedding_params:
            groups["embedding"].append(p)
        elif "lora_B" in name or p.ndim == 1:
            decays = id(p) not in layernorm_params and "bias" not in name
            groups["B" if decays else "B_no_decay"].append(p)
        else:
            groups["A"].append(p)
    decay = kwargs.pop("loraplus_weight_decay", 0.0)
    return optimizer_cls([
        {"params": groups["A"], "weight_decay": decay, "lr": lr},
        {"params": groups["embedding"], "weight_decay": decay, "lr": loraplus_lr_embedding},
        {"params": groups["B"], "weight_decay": decay, "lr": lr * loraplus_lr_ratio},
        {"params": groups["B_no_decay"], "weight_decay": 0.0, "lr": lr * loraplus_lr_ratio},
    ], lr=lr, **kwargs)
