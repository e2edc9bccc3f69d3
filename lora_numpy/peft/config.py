"""Floor 6: ``LoraConfig``, with Hugging Face PEFT's field names, defaults and JSON form.

Every field is checked for its type as well as its range when the config is made, so a bad
value fails here, before any model is touched: ``use_rslora="false"`` (a non-empty string, so
truthy) would otherwise switch rsLoRA *on*.
"""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field, fields

INIT_CHOICES = "True, False, 'gaussian', 'pissa', 'pissa_niter_K' (K an integer >= 0)"
BIAS_CHOICES = ("none", "all", "lora_only")
TASK_TYPES = (None, "CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "SEQ_2_SEQ_LM", "QUESTION_ANS",
              "FEATURE_EXTRACTION")  # PEFT's TaskType values

# Keys PEFT itself writes into adapter_config.json for features this package does not have.
# A file may hold them only at PEFT's default (what PEFT writes when the feature is unused);
# any other value would change the model, so it is refused rather than ignored.
PEFT_DEFAULTS = {
    "alpha_pattern": {}, "rank_pattern": {}, "fan_in_fan_out": False, "layers_to_transform": None,
    "layers_pattern": None, "lora_bias": False, "exclude_modules": None, "loftq_config": {},
    "layer_replication": None, "megatron_config": None, "megatron_core": "megatron.core",
    "target_parameters": None, "trainable_token_indices": None, "use_qalora": False,
    "qalora_group_size": 16, "eva_config": None, "corda_config": None, "lora_ga_config": None,
    "alora_invocation_tokens": None, "arrow_config": None, "kasa_config": None,
    "monteclora_config": None, "velora_config": None, "use_bdlora": None,
    "ensure_weight_tying": False, "runtime_config": {"ephemeral_gpu_offload": False},
}
# Keys that describe where an adapter came from, not what it computes.
PEFT_INFO_KEYS = ("base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
                  "peft_version")


def pissa_niter(init) -> int | None:
    """K for ``"pissa_niter_K"``, -1 for exact ``"pissa"``, None for any other init."""
    if init == "pissa":
        return -1
    match = re.fullmatch(r"pissa_niter_(\d+)", init) if isinstance(init, str) else None
    return int(match.group(1)) if match else None


def _is_bool(value) -> bool:
    return isinstance(value, bool) or type(value).__name__ == "bool_"  # NumPy's bool too


def _check_bool(name: str, value) -> bool:
    if not _is_bool(value):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__}); "
                        f"a string such as 'false' is not a boolean")
    return bool(value)


def _check_real(name: str, value):
    """A finite int or float (NumPy's too), returned as a plain Python number for JSON."""
    if _is_bool(value) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def _check_names(name: str, value) -> tuple:
    """A bare string is one name (PEFT's rule for modules_to_save); a list/tuple/set of names."""
    names = (value,) if isinstance(value, str) else value
    if not isinstance(names, (list, tuple, set, frozenset)) or not all(
            isinstance(n, str) and n for n in names):
        raise TypeError(f"{name} must be a name or a list of names (non-empty strings), got {value!r}")
    return tuple(sorted(names) if isinstance(names, (set, frozenset)) else names)


@dataclass
class LoraConfig:
    r: int = 8                          # rank of the update ΔW = B A
    lora_alpha: float = 8               # scale: ΔW enters the layer as (lora_alpha / r) · B A
    lora_dropout: float = 0.0           # dropout on the LoRA path's input only
    target_modules: tuple | str = ("q_proj", "v_proj")  # names (or suffixes) of Linear or
    # Embedding layers to adapt; a string is a regular expression matched against the full name,
    # "all-linear" every Linear but the output head
    init_lora_weights: bool | str = True  # True: A Kaiming-uniform, B = 0; see INIT_CHOICES
    use_rslora: bool = False            # rank-stabilised scale lora_alpha / √r (Kalajdzievski 2023)
    use_dora: bool = False              # DoRA: a trained magnitude per output row (Liu et al. 2024)
    bias: str = "none"                  # which biases train: "none", "all", or "lora_only"
    modules_to_save: tuple | None = None  # modules trained in full and saved with the adapter
    # (a new classification head, say)
    task_type: str | None = None        # PEFT's TaskType ("CAUSAL_LM", "SEQ_CLS", ...), recorded
    peft_type: str = field(default="LORA", repr=False)

    def __post_init__(self):
        if _is_bool(self.r) or not isinstance(self.r, numbers.Integral) or self.r < 1:
            raise ValueError(f"r must be an integer >= 1, got {self.r!r}")
        self.r = int(self.r)
        self.lora_alpha = _check_real("lora_alpha", self.lora_alpha)
        if not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        self.lora_dropout = _check_real("lora_dropout", self.lora_dropout)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        self.use_rslora = _check_bool("use_rslora", self.use_rslora)
        self.use_dora = _check_bool("use_dora", self.use_dora)
        init = self.init_lora_weights
        if not (init is True or init is False or init == "gaussian" or pissa_niter(init) is not None):
            raise ValueError(f"init_lora_weights={init!r} is not one of {INIT_CHOICES}")
        if pissa_niter(init) is not None and self.lora_dropout > 0:
            raise ValueError(f"PiSSA needs lora_dropout=0 (got {self.lora_dropout}): it starts from "
                             "the weight's principal part, and dropout on that path would change the "
                             "model's output at step 0")
        if not isinstance(self.bias, str) or self.bias not in BIAS_CHOICES:
            raise ValueError(f"bias={self.bias!r}; choose one of {BIAS_CHOICES}")
        if isinstance(self.target_modules, str):
            if not self.target_modules:
                raise ValueError("target_modules is empty: name at least one layer to adapt")
            try:
                re.compile(self.target_modules)
            except re.error as err:
                raise ValueError(f"target_modules={self.target_modules!r} is not a valid regular "
                                 f"expression ({err}); pass a list of names to match by name") from None
        else:
            self.target_modules = _check_names("target_modules", self.target_modules)
            if not self.target_modules:
                raise ValueError("target_modules is empty: name at least one layer to adapt")
        if self.modules_to_save is not None:
            self.modules_to_save = _check_names("modules_to_save", self.modules_to_save)
        if self.task_type not in TASK_TYPES:
            raise ValueError(f"task_type={self.task_type!r}; choose one of {TASK_TYPES}")
        if self.peft_type != "LORA":
            raise ValueError(f"peft_type={self.peft_type!r}: only 'LORA' adapters exist here")

    @property
    def scaling(self) -> float:
        """s in h = W0 x + s · B A x: lora_alpha / r, or lora_alpha / √r with rsLoRA."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_dict(self) -> dict:
        """The ``adapter_config.json`` PEFT writes: these fields under PEFT's names, lists for
        tuples, and PEFT's own defaults for what PEFT has and this package does not."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        for key in ("target_modules", "modules_to_save"):
            if isinstance(d[key], tuple):
                d[key] = list(d[key])
        keep = ("alpha_pattern", "rank_pattern", "fan_in_fan_out", "layers_to_transform",
                "layers_pattern", "lora_bias", "exclude_modules")
        return {**d, **{k: PEFT_DEFAULTS[k] for k in keep},
                "base_model_name_or_path": None, "revision": None, "inference_mode": True}

    @classmethod
    def from_dict(cls, d: dict, source: str = "adapter config") -> "LoraConfig":
        """Read what :meth:`to_dict` (or PEFT) wrote. A key that is neither a field here nor one
        PEFT writes is refused by name, as is a PEFT feature switched on that this package lacks."""
        if not isinstance(d, dict):
            raise ValueError(f"{source} must hold a JSON object, got {type(d).__name__}")
        if d.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"{source}: peft_type={d['peft_type']!r}; only 'LORA' adapters load here")
        own = {f.name for f in fields(cls)}
        unknown = sorted(k for k in d if k not in own and k not in PEFT_DEFAULTS and k not in PEFT_INFO_KEYS)
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown}; a LoraConfig has {sorted(own)}")
        unsupported = [f"{k}={d[k]!r}" for k in d if k in PEFT_DEFAULTS and d[k] != PEFT_DEFAULTS[k]
                       and not (d[k] in (None, {}, []) and PEFT_DEFAULTS[k] in (None, {}, []))]
        if unsupported:
            raise ValueError(f"{source}: {unsupported} use PEFT features this package does not "
                             "implement; only their defaults load here")
        return cls(**{k: v for k, v in d.items() if k in own})
