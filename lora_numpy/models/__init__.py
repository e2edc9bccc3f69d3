"""Floor 5: models."""
from .gpt import GPT, GPTConfig, GPTForSequenceClassification

__all__ = ["GPT", "GPTConfig", "GPTForSequenceClassification"]
