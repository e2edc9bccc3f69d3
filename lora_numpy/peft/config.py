"""Floor 6: ``LoraConfig``, with Hugging Face PEFT's field names and defaults."""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

INIT_CHOICES = "True, False, 'gaussian', 'pissa', 'pissa_niter_K' (K an integer >= 0)"
BIAS_CHOICES = ("none", "all", "lora_only")


def pissa_niter(init) -> int | None:
    """K for ``"pissa_niter_K"``, -1 for exact ``"pissa"``, None for any other init."""
    if init == "pissa":
        return -1
    match = re.fullmatch(r"pissa_niter_(\d+)", init) if isinstance(init, str) else None
    return int(match.group(1)) if match else None


@dataclass
class LoraConfig:
    r: int = 8                          # rank of the update ΔW = B A
    lora_alpha: float = 8               # scale: ΔW enters the layer as (lora_alpha / r) · B A
    lora_dropout: float = 0.0           # dropout on the LoRA path's input only
    target_modules: tuple | str = ("q_proj", "v_proj")  # names (or suffixes) of Linears to adapt;
    # a string is a regular expression matched against the full name, "all-linear" every Linear
    # but the output head
    init_lora_weights: bool | str = True  # True: A Kaiming-uniform, B = 0; see INIT_CHOICES
    use_rslora: bool = False            # rank-stabilised scale lora_alpha / √r (Kalajdzievski 2023)
    bias: str = "none"                  # which biases train: "none", "all", or "lora_only"
    modules_to_save: tuple | None = None  # modules trained in full and saved with the adapter
    # (a new classification head, say)
    peft_type: str = field(default="LORA", repr=False)

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be an integer >= 1, got {self.r!r}")
        if not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        init = self.init_lora_weights
        if not (init is True or init is False or init == "gaussian" or pissa_niter(init) is not None):
            raise ValueError(f"init_lora_weights={init!r} is not one of {INIT_CHOICES}")
        if pissa_niter(init) is not None and self.lora_dropout > 0:
            raise ValueError(f"PiSSA needs lora_dropout=0 (got {self.lora_dropout}): it starts from "
                             "the weight's principal part, and dropout on that path would change the "
                             "model's output at step 0")
        if self.bias not in BIAS_CHOICES:
            raise ValueError(f"bias={self.bias!r}; choose one of {BIAS_CHOICES}")
        if isinstance(self.target_modules, list):
            self.target_modules = tuple(self.target_modules)
        if not self.target_modules:
            raise ValueError("target_modules is empty: name at least one Linear layer to adapt")
        if self.modules_to_save is not None:
            self.modules_to_save = tuple(self.modules_to_save)

    @property
    def scaling(self) -> float:
        """s in h = W0 x + s · B A x: lora_alpha / r, or lora_alpha / √r with rsLoRA."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LoraConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)
