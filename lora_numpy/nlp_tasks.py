"""Floor 8 (beside recipes.py): the tasks interviews ask about, on text, by every method.

    ner        character-level BIO tagging of a synthetic corpus        TOKEN_CLS   entity F1
    translate  English -> French number words, prompt + response (SFT)  CAUSAL_LM   exact match, chrF
    docs       which documentation section a stdlib paragraph is from   SEQ_CLS     macro-F1

A base model is pretrained on the standard library's documentation, either as a decoder (next
token, ``causal=True``) or as an encoder (masked LM, ``causal=False``; :func:`pretrain_mlm`);
every task object turns a base into the model it fine-tunes (``make_model``), gives batches
(``batch_fn``), the loss (``loss_fn``) and its metrics (``evaluate``), like ``recipes.Task``.

Which parts train follows PEFT's task types (``TASK_TYPES``): LoRA adapts the Linear layers of
the blocks, and the head that a task adds is new, so it trains in full and is saved with the
adapter (``modules_to_save``). A language-modelling task keeps its pretrained ``lm_head``
frozen, as PEFT's CAUSAL_LM does.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .checkpoint import save_model
from .data import (DocSectionsTask, MaskedLMDataset, NERCorpus, NumberTranslationTask, TextDataset,
                   stdlib_docs_text, text_tokenizer)
from .evaluate import evaluating, greedy_until_stop
from .metrics import chrf, classification_report, entity_scores, token_accuracy
from .models import GPT, GPTConfig, GPTForSequenceClassification, GPTForTokenClassification
from .peft import LoraConfig, get_peft_model
from .recipes import ModelSize
from .train import TrainConfig, default_loss, train
from . import backend

NLP_TASK_NAMES = ("ner", "translate", "docs")
METHODS = ("full", "lora", "pissa")
BASE_BLOCK_SIZE = 136  # the longest task row (a translation of a six-digit number) fits
# Every Linear of the blocks; not "all-linear", whose list of heads to skip has no "classifier".
ADAPTED_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@dataclass(frozen=True)
class TaskType:
    """What PEFT's ``task_type`` decides: the head and whether it trains in full."""
    head: str                       # the output layer's module name
    modules_to_save: tuple | None   # trained in full and saved with the adapter (a new head)


TASK_TYPES = {
    "CAUSAL_LM": TaskType("lm_head", None),          # the pretrained LM head is reused, frozen
    "SEQ_CLS": TaskType("score", ("score",)),        # a new head: trained in full
    "TOKEN_CLS": TaskType("classifier", ("classifier",)),
}


def lora_config(task_type: str, method: str, r: int = 8, lora_alpha: float = 16) -> LoraConfig:
    """The LoraConfig for ``method`` ("lora" or "pissa") on a task of ``task_type``."""
    if task_type not in TASK_TYPES:
        raise ValueError(f"unknown task_type {task_type!r}; choose one of {', '.join(TASK_TYPES)}")
    if method not in ("lora", "pissa"):
        raise ValueError(f"method {method!r} has no adapter config; choose 'lora' or 'pissa'")
    return LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=ADAPTED_MODULES,
                      init_lora_weights=True if method == "lora" else "pissa",
                      modules_to_save=TASK_TYPES[task_type].modules_to_save)


# ---- pretraining -------------------------------------------------------------------------------

def pretrain_base(causal: bool = True, steps: int = 600, size: ModelSize | None = None,
                  batch_size: int = 32, lr: float = 3e-3, seed: int = 0, out: str | Path | None = None,
                  text: str | None = None, progress: bool = True):
    """A base model pretrained on ``text`` (default: the stdlib documentation) with the shared
    vocabulary: a decoder by next-token prediction, or an encoder by masked LM. Returns
    (GPT, report dict with final_loss, val_loss, train_seconds); saved to ``out`` if given."""
    size = size or ModelSize()
    text = stdlib_docs_text() if text is None else text
    tokenizer = text_tokenizer()
    data = TextDataset(text, tokenizer) if causal else MaskedLMDataset(text, tokenizer)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=BASE_BLOCK_SIZE, n_layer=size.n_layer,
                       n_head=size.n_head, n_embd=size.n_embd, causal=causal)
    model = GPT(config, seed)
    batch_fn = lambda rng: data.get_batch("train", batch_size, BASE_BLOCK_SIZE, rng)  # noqa: E731
    train_cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=min(100, steps // 10),
                            eval_every=0, seed=seed)
    start = time.perf_counter()
    history = train(model, batch_fn, train_cfg, progress=progress,
                    label="pretrain " + ("causal" if causal else "mlm"))
    rng = np.random.default_rng(seed)
    with evaluating(model):
        val = [model(*data.get_batch("val", batch_size, BASE_BLOCK_SIZE, rng))[1].item() for _ in range(4)]
    report = {"task": "causal" if causal else "mlm", "steps": steps, "final_loss": history[-1]["loss"],
              "val_loss": float(np.mean(val)), "train_seconds": time.perf_counter() - start}
    if out is not None:
        save_model(out, model, {"tokenizer": tokenizer.to_dict(), "report": report})
    return model, report


def pretrain_mlm(steps: int = 600, **kwargs):
    """``pretrain --task mlm``: an encoder (causal=False) pretrained by BERT's masked LM."""
    return pretrain_base(causal=False, steps=steps, **kwargs)


# ---- tasks -------------------------------------------------------------------------------------

def _with_body(head_model, base: GPT):
    head_model.transformer.load_state_dict(base.state_dict())
    return head_model


@dataclass
class NERTask:
    """Token classification: one BIO label per character (entity-level F1 is the headline)."""
    data: NERCorpus = field(default_factory=NERCorpus)
    name: str = "ner"
    task_type: str = "TOKEN_CLS"
    metric: str = "entity_f1"

    @property
    def block_size(self) -> int:
        return self.data.block_size

    def make_model(self, base: GPT, seed: int = 0):
        return _with_body(GPTForTokenClassification(base.config, self.data.num_labels, seed), base)

    def batch_fn(self, batch_size: int):
        return lambda rng: self.data.get_batch("train", batch_size, rng)

    loss_fn = staticmethod(default_loss)

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
class TranslateTask:
    """Supervised fine-tuning of a causal LM: prompt (English) + response (French) + stop token.
    ``response_only=False`` puts the loss on the prompt too (the mistake, kept to measure it)."""
    data: NumberTranslationTask = field(default_factory=NumberTranslationTask)
    response_only: bool = True
    name: str = "translate"
    task_type: str = "CAUSAL_LM"
    metric: str = "exact_match"

    @property
    def block_size(self) -> int:
        return self.data.block_size

    def make_model(self, base: GPT, seed: int = 0):
        return copy.deepcopy(base)

    def batch_fn(self, batch_size: int):
        return lambda rng: self.data.get_batch("train", batch_size, rng, self.response_only)

    loss_fn = staticmethod(default_loss)

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
class DocsTask:
    """Sequence classification of stdlib documentation paragraphs (``score`` on the last real
    token). ``class_weighted`` weighs the loss by inverse class frequency."""
    data: DocSectionsTask = field(default_factory=DocSectionsTask)
    class_weighted: bool = False
    name: str = "docs"
    task_type: str = "SEQ_CLS"
    metric: str = "macro_f1"

    @property
    def block_size(self) -> int:
        return self.data.block_size

    def make_model(self, base: GPT, seed: int = 0):
        return _with_body(GPTForSequenceClassification(base.config, self.data.n_classes, seed), base)

    def batch_fn(self, batch_size: int):
        return lambda rng: self.data.get_batch("train", batch_size, rng)

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


def make_nlp_task(name: str, **options):
    """``compare --target ner|translate|docs``: the task object (options go to its dataclass,
    e.g. ``response_only=False`` or ``class_weighted=True``)."""
    tasks = {"ner": NERTask, "translate": TranslateTask, "docs": DocsTask}
    if name not in tasks:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(NLP_TASK_NAMES)}")
    return tasks[name](**options)


# ---- fine-tuning -------------------------------------------------------------------------------

DEFAULT_LR = {"full": 1e-3, "lora": 5e-3, "pissa": 2e-3}


@dataclass
class FinetuneResult:
    method: str
    trainable_params: int
    all_params: int
    seconds: float
    metrics: dict      # task.evaluate on the test split after training
    history: list      # train()'s per-step records


def prepare(task, base: GPT, method: str, seed: int = 0, r: int = 8, lora_alpha: float = 16):
    """A fresh model for ``method``: the task's model on a copy of ``base``, adapters if any."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    model = task.make_model(copy.deepcopy(base), seed)
    if method == "full":
        return model
    return get_peft_model(model, lora_config(task.task_type, method, r, lora_alpha), seed=seed)


def finetune(task, base: GPT, method: str, steps: int = 300, batch_size: int = 32,
             lr: float | None = None, seed: int = 0, r: int = 8, lora_alpha: float = 16,
             eval_limit: int | None = None, progress: bool = False) -> FinetuneResult:
    """Fine-tune a copy of ``base`` on ``task`` by ``method``; evaluate on the test split."""
    model = prepare(task, base, method, seed, r, lora_alpha)
    config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr or DEFAULT_LR[method],
                         warmup_steps=steps // 10, weight_decay=0.0, eval_every=0, seed=seed)
    start = time.perf_counter()
    history = train(model, task.batch_fn(batch_size), config, loss_fn=task.loss_fn,
                    progress=progress, label=f"{task.name} {method}")
    seconds = time.perf_counter() - start
    return FinetuneResult(method, model.num_parameters(trainable_only=True), model.num_parameters(),
                          seconds, task.evaluate(model, eval_limit), history)
