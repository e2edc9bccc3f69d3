"""Floor 6: LoRA and PiSSA with Hugging Face PEFT's names (config.py, layer.py, model.py),
and the SVD tools they rest on (svd.py)."""
from .config import LoraConfig
from .layer import LoraLinear
from .model import PeftModel, find_targets, get_peft_model
from .svd import low_rank_approximation, randomized_svd, split_factors, truncate_product

__all__ = ["LoraConfig", "LoraLinear", "PeftModel", "find_targets", "get_peft_model",
           "low_rank_approximation", "randomized_svd", "split_factors", "truncate_product"]
