"""Floor 5: models."""
from .gpt import GPT, GPTConfig, GPTForSequenceClassification, GPTForTokenClassification

__all__ = ["GPT", "GPTConfig", "GPTForSequenceClassification", "GPTForTokenClassification"]
