"""Floor 6: LoRA, PiSSA and DoRA with Hugging Face PEFT's names and files.

One adapted layer's math: tuner.py (what every adapted layer shares: named adapters), layer.py
(``LoraLinear``: LoRA, PiSSA, DoRA), embedding.py (``LoraEmbedding``). A whole model:
model.py (``get_peft_model``, ``PeftModel``), files.py (PEFT's adapter files), weighted.py
(adapter arithmetic), loraplus.py (LoRA+ optimizer groups), and the SVD tools (svd.py).
"""
from .config import LoraConfig
from .embedding import LoraEmbedding
from .layer import LoraLinear
from .loraplus import create_loraplus_optimizer
from .model import PeftModel, get_peft_model
from .targets import find_targets
from .svd import low_rank_approximation, randomized_svd, split_factors, truncate_product
from .tuner import LoraLayer

__all__ = ["LoraConfig", "LoraEmbedding", "LoraLayer", "LoraLinear", "PeftModel",
           "create_loraplus_optimizer", "find_targets", "get_peft_model", "low_rank_approximation",
           "randomized_svd", "split_factors", "truncate_product"]
