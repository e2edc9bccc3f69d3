"""Floor 8 (first): what a task is to the training loop and the reports, one interface for all.

Every task, arithmetic or text, is a :class:`Task`: a ``name``, a PEFT ``task_type``, the headline
``metric``, its ``data`` and ``block_size``, and four methods:

    make_model(base, seed)   the model to fine-tune, built on a pretrained base by task type
    batch_fn(batch_size)     rng -> one training batch (the model's positional inputs, targets last)
    loss_fn(model, batch)    the training loss of a batch
    evaluate(model, limit, split) -> dict of metrics, ``metric`` among them

The text tasks (``ner``, ``translate``, ``docs``) live here; the arithmetic skills and language
modelling are in ``recipes.py``, whose ``TASKS`` registry names them all.

Which head a task type uses and whether it trains follows PEFT (``TASK_TYPES``): a new head
(``score``, ``classifier``) trains in full and is saved with the adapter (``modules_to_save``);
a language-modelling task reuses the pretrained ``lm_head``, frozen.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import backend
from .data import DocSectionsTask, NERCorpus, NumberTranslationTask
from .evaluate import evaluating, greedy_until_stop
from .metrics import chrf, classification_report, entity_scores, token_accuracy
from .models import GPT, GPTForSequenceClassification, GPTForTokenClassification
from .train import default_loss


@dataclass(frozen=True)
class TaskType:
    """What PEFT's ``task_type`` decides: the head and whether it trains in full."""
    head: str                       # the output layer's module name
    modules_to_save: tuple | None   # trained in full and saved with the adapter (a new head)
    model_class: type | None        # the head model around the base's body (None: the base itself)

    def build(self, base: GPT, num_labels: int | None, seed: int):
        """The model of this task type on ``base``'s weights (``base`` itself for a language model)."""
        if self.model_class is None:
            return base
        model = self.model_class(base.config, num_labels, seed)
        model.transformer.load_state_dict(base.state_dict())
        return model


TASK_TYPES = {
    "CAUSAL_LM": TaskType("lm_head", None, None),      # the pretrained LM head is reused, frozen
    "SEQ_CLS": TaskType("score", ("score",), GPTForSequenceClassification),  # a new head: trained in full
    "TOKEN_CLS": TaskType("classifier", ("classifier",), GPTForTokenClassification),
}


class Task:
    """The interface every task follows (subclasses are dataclasses that hold ``data``).

    Defaults: ``block_size`` and ``vocab_size`` come from the data, a batch is
    ``data.get_batch("train", batch_size, rng)``, the loss is the model's own, and the model is
    the task type's (``TASK_TYPES``) on the base. ``causal`` says what pretraining on the task
    makes: a decoder (True) or an encoder (masked LM)."""
    name: str
    metric: str
    task_type = "CAUSAL_LM"
    causal = True
    num_labels: int | None = None   # classes of a SEQ_CLS / TOKEN_CLS head
    class_names: tuple = ()         # the order of per-class metrics, where evaluate gives them
    reach: float = 0.9              # the headline value that counts as learned ("steps to 90%")
    noise_floor: float = 0.01       # a paired difference in the headline below this reads as noise

    @property
    def block_size(self) -> int:
        return self.data.block_size

    @property
    def vocab_size(self) -> int:
        return self.data.tokenizer.vocab_size

    @property
    def skills(self) -> list:
        """The names of the parts scored one by one (a mixture's skills, else the task itself)."""
        return [self.name]

    def make_model(self, base: GPT, seed: int = 0):
        """The model to fine-tune, on ``base``'s weights (pass a copy if you keep ``base``)."""
        if self.task_type not in TASK_TYPES:
            raise ValueError(f"unknown task_type {self.task_type!r}; choose one of {', '.join(TASK_TYPES)}")
        return TASK_TYPES[self.task_type].build(base, self.num_labels, seed)

    def batch_fn(self, batch_size: int):
        return lambda rng: self.data.get_batch("train", batch_size, rng)

    def loss_fn(self, model, batch):
        return default_loss(model, batch)

    def evaluate(self, model, limit: int | None = None, split: str = "test") -> dict:
        raise NotImplementedError(f"{type(self).__name__} must define evaluate(model, limit, split)")


@dataclass
class NERTask(Task):
    """Token classification: one BIO label per character (entity-level F1 is the headline)."""
    data: NERCorpus = field(default_factory=NERCorpus)
    name: str = "ner"
    task_type: str = "TOKEN_CLS"
    metric: str = "entity_f1"

    @property
    def num_labels(self) -> int:
        return self.data.num_labels

    def predict(self, model, x, batch_size: int = 500) -> np.ndarray:
        with evaluating(model):
            return np.concatenate([backend.to_numpy(model(x[i:i + batch_size])[0].data.argmax(-1))
                                   for i in range(0, len(x), batch_size)])

    def evaluate(self, model, limit: int | None = None, split: str = "test") -> dict:
        x, labels = self.data.examples(split)
        x, labels = x[:limit], labels[:limit]
        pred = np.where(labels == -100, -100, self.predict(model, x))
        scores = entity_scores(self.data.tag_sequences(labels), self.data.tag_sequences(pred))
        return {"entity_f1": scores.f1, "entity_precision": scores.precision,
                "entity_recall": scores.recall, "token_accuracy": token_accuracy(labels, pred)}


@dataclass
class TranslateTask(Task):
    """Supervised fine-tuning of a causal LM: prompt (English) + response (French) + stop token.
    ``response_only=False`` puts the loss on the prompt too (the mistake, kept to measure it)."""
    data: NumberTranslationTask = field(default_factory=NumberTranslationTask)
    response_only: bool = True
    name: str = "translate"
    metric: str = "chrf"    # the headline: exact match is 0 for most runs at this scale, chrF grades them
    reach: float = 90.0     # chrF is on sacrebleu's 0-100 scale
    noise_floor: float = 1.0

    def batch_fn(self, batch_size: int):
        return lambda rng: self.data.get_batch("train", batch_size, rng, self.response_only)

    def translate(self, model, prompts: list) -> list:
        """Greedy translations (strings, stop token removed) of prompt strings."""
        tok = self.data.tokenizer
        longest = max(len(self.data.response(n)) for n in self.data.numbers["train"])
        outs = greedy_until_stop(model, [tok.encode(p) for p in prompts], self.data.stop_id,
                                 max_new_tokens=min(longest + 8, model.config.block_size + 1
                                                    - max(len(p) for p in prompts)))
        return [tok.decode(o) for o in outs]

    def evaluate(self, model, limit: int | None = 200, split: str = "test") -> dict:
        prompts, refs = self.data.examples(split)
        prompts, refs = prompts[:limit], refs[:limit]
        hyps = self.translate(model, prompts)
        return {"exact_match": float(np.mean([h == r for h, r in zip(hyps, refs)])),
                "chrf": chrf(hyps, refs)}


@dataclass
class DocsTask(Task):
    """Sequence classification of stdlib documentation paragraphs (``score`` on the last real
    token). ``class_weighted`` weighs the loss by inverse class frequency."""
    data: DocSectionsTask = field(default_factory=DocSectionsTask)
    class_weighted: bool = False
    name: str = "docs"
    task_type: str = "SEQ_CLS"
    metric: str = "macro_f1"

    @property
    def num_labels(self) -> int:
        return self.data.n_classes

    @property
    def class_names(self) -> tuple:
        return tuple(self.data.class_names)

    def loss_fn(self, model, batch):
        weight = backend.asarray(self.data.class_weights()) if self.class_weighted else None
        return model(*batch, class_weight=weight)[1]

    def evaluate(self, model, limit: int | None = None, split: str = "test") -> dict:
        x, lengths, labels = self.data.examples(split)
        with evaluating(model):
            pred = backend.to_numpy(model(x[:limit], lengths[:limit])[0].data.argmax(-1))
        report = classification_report(labels[:limit], pred, self.data.n_classes)
        return {"accuracy": report["accuracy"], "macro_f1": report["macro_f1"],
                "precision": report["precision"], "recall": report["recall"]}
