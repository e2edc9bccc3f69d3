"""Floor 8: named tasks, model sizes, and pretraining.

The tasks share one character vocabulary, so one base model can be pretrained on source skills
and fine-tuned on a target task:

    add      "07+35=042"  exact-match accuracy by greedy decoding
    sub      "35-07=28"   exact-match accuracy
    mul      "07*35=0245" exact-match accuracy
    absdiff  "07|35=28"   |a - b|, exact-match accuracy (the main job's new skill)
    sum      "07+35" -> sum<66 | 66<=sum<133 | sum>=133              (sequence classification)
    text     the standard library's documentation, or --text-file   (language modelling)

The text tasks share a second vocabulary (``data.text_tokenizer()``, with a mask token) and a
base pretrained on the documentation: a decoder (``causal``) or an encoder (``mlm``):

    causal     next-token prediction on the documentation           (a decoder's pretraining)
    mlm        masked language modelling on the documentation       (an encoder's pretraining)
    ner        BIO tag per character of template sentences         entity F1 (TOKEN_CLS)
    translate  English -> French number words, prompt + response   exact match, chrF (CAUSAL_LM)
    docs       which documentation section a paragraph is from     macro-F1 (SEQ_CLS)

A comma joins arithmetic skills into one mixture: ``make_task("add,sub")`` trains on both and
reports each skill's accuracy (``accuracy_add``, ``accuracy_sub``) beside their mean.
A new task is one entry in ``TASKS``: a function returning a ``tasks.Task``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .checkpoint import save_model
from .data import (ArithmeticTask, DocSectionsTask, MaskedLMDataset, NERCorpus, NumberTranslationTask,
                   SkillMixture, SumClassificationTask, TextDataset, load_text_file, stdlib_docs_text,
                   text_tokenizer)
from .evaluate import classification_metrics, exact_match_accuracy, mean_loss
from .models import GPT, GPTConfig
from .tasks import DocsTask, NERTask, Task, TranslateTask
from .train import TrainConfig, save_history_csv, train

ARITHMETIC_OPS = {"add": "+", "sub": "-", "mul": "*", "absdiff": "|"}
VAL_FRACTION = 0.1  # held out of training for choices (learning rates); the test split is untouched
PRETRAIN_LR = 3e-3  # peak learning rate of `pretrain` (and of the cached base models)


TEXT_BLOCK_SIZE = 136  # the text base's context: the longest text-task row (a six-digit translation) fits


@dataclass
class SkillTask(Task):
    """An arithmetic skill, a mixture of them, or the "sum" classification, scored by
    ``evaluate_fn(model, split, limit)``."""
    name: str
    data: object            # ArithmeticTask, SkillMixture or SumClassificationTask
    metric: str             # "accuracy"
    evaluate_fn: Callable
    task_type: str = "CAUSAL_LM"
    num_labels: int | None = None

    @property
    def block_size(self) -> int:
        return self.data.seq_len

    @property
    def skills(self) -> list:
        return list(self.data.tasks) if isinstance(self.data, SkillMixture) else [self.name]

    def evaluate(self, model, limit: int | None = None, split: str = "test") -> dict:
        """The headline metric on held-out data ("test", or "val" for choices), plus the rest."""
        return self.evaluate_fn(model, split, limit)


@dataclass
class TextTask(Task):
    """Language modelling on a text: next token (a decoder) or masked LM (``causal=False``, an
    encoder). Scored by the mean loss on fixed windows of the held-out part ("val_loss")."""
    name: str
    data: object            # TextDataset, or MaskedLMDataset when causal is False
    block_size: int = 64
    causal: bool = True
    metric: str = "val_loss"

    def batch_fn(self, batch_size: int):
        return lambda rng: self.data.get_batch("train", batch_size, self.block_size, rng)

    def evaluate(self, model, limit: int | None = None, split: str = "val") -> dict:
        rng = np.random.default_rng(0)  # the same windows (and masks) every time
        batches = [self.data.get_batch("val", 32, self.block_size, rng) for _ in range(8)]
        return {"val_loss": mean_loss(model, batches)}


def _arithmetic(name: str, max_train: int | None = None) -> Task:
    data = ArithmeticTask(ARITHMETIC_OPS[name], n_digits=2, val_fraction=VAL_FRACTION, max_train=max_train)
    evaluate = lambda model, split, limit: {"accuracy": exact_match_accuracy(model, data, split, limit)}
    return SkillTask(name, data, "accuracy", evaluate)


def _mixture(names: list, max_train: int | None = None) -> Task:
    data = SkillMixture({n: _arithmetic(n, max_train).data for n in names})

    def evaluate(model, split, limit):
        scores = {f"accuracy_{n}": exact_match_accuracy(model, t, split, limit) for n, t in data.tasks.items()}
        return {"accuracy": float(np.mean(list(scores.values()))), **scores}
    return SkillTask(",".join(names), data, "accuracy", evaluate)


def _sum(max_train: int | None = None) -> Task:
    data = SumClassificationTask(n_digits=2, val_fraction=VAL_FRACTION, max_train=max_train)

    def evaluate(model, split, limit):
        report = classification_metrics(model, data, split)
        return {k: report[k] for k in ("accuracy", "macro_f1", "macro_precision", "macro_recall")}
    return SkillTask("sum", data, "accuracy", evaluate, "SEQ_CLS", data.n_classes)


def _text(text_file: str | None = None) -> Task:
    return TextTask("text", TextDataset(load_text_file(text_file) if text_file else stdlib_docs_text()))


def _text_base(causal: bool) -> Task:
    """The documentation in the text tasks' vocabulary: the base of ner / translate / docs."""
    text, tokenizer = stdlib_docs_text(), text_tokenizer()
    data = TextDataset(text, tokenizer) if causal else MaskedLMDataset(text, tokenizer)
    return TextTask("causal" if causal else "mlm", data, TEXT_BLOCK_SIZE, causal)


# name -> factory(max_train, text_file) -> Task; one entry per task
TASKS = {**{name: (lambda max_train, text_file, name=name: _arithmetic(name, max_train)) for name in ARITHMETIC_OPS},
         "sum": lambda max_train, text_file: _sum(max_train),
         "text": lambda max_train, text_file: _text(text_file),
         "causal": lambda max_train, text_file: _text_base(causal=True),
         "mlm": lambda max_train, text_file: _text_base(causal=False),
         "ner": lambda max_train, text_file: NERTask(NERCorpus(**_cap(max_train))),
         # greedy decoding is what evaluating a translation costs: 40 numbers validate, 60 test
         "translate": lambda max_train, text_file: TranslateTask(NumberTranslationTask(n_val=40, n_test=60,
                                                                                       **_cap(max_train))),
         "docs": lambda max_train, text_file: DocsTask(DocSectionsTask())}
TASK_NAMES = tuple(TASKS)
LM_TASKS = (*ARITHMETIC_OPS, "text", "causal", "mlm")  # what `pretrain` can train
TEXT_TARGETS = ("ner", "translate", "docs")            # fine-tuned on a text base
TARGETS = (*ARITHMETIC_OPS, "sum", *TEXT_TARGETS)      # what `compare` can fine-tune on
# the base each target is fine-tuned from by default: BERT-style encoder for tagging, else a decoder
DEFAULT_SOURCE = {"ner": "mlm", "translate": "causal", "docs": "causal"}


def _cap(max_train: int | None) -> dict:
    return {} if max_train is None else {"n_train": max_train}


def make_task(name: str, text_file: str | None = None, max_train: int | None = None) -> Task:
    """A task by name; "add,sub" mixes arithmetic skills; ``max_train`` caps training examples."""
    parts = name.split(",")
    if len(parts) > 1:
        unknown = [p for p in parts if p not in ARITHMETIC_OPS]
        if unknown or len(set(parts)) != len(parts):
            raise ValueError(f"a mixture joins distinct arithmetic skills ({', '.join(ARITHMETIC_OPS)}) "
                             f"with commas, got {name!r}")
        return _mixture(parts, max_train)
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASK_NAMES)} "
                         "or join arithmetic skills with commas, e.g. add,sub")
    return TASKS[name](max_train, text_file)


@dataclass(frozen=True)
class ModelSize:
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64


@dataclass(frozen=True)
class BenchmarkSize:
    """A named size of benchmarks/train_step.py: the model and the batch one step runs on."""
    model: ModelSize
    context: int
    batch: int
    vocab: int = 96


BENCHMARK_SIZES = {"tiny": BenchmarkSize(ModelSize(2, 2, 64), 32, 16),
                   "small": BenchmarkSize(ModelSize(4, 4, 128), 64, 32),
                   "medium": BenchmarkSize(ModelSize(6, 6, 384), 128, 16)}


def build_model(task: Task, size: ModelSize, seed: int = 0) -> GPT:
    """A fresh GPT to pretrain on ``task``: a decoder, or an encoder when ``task.causal`` is False."""
    config = GPTConfig(vocab_size=task.vocab_size, block_size=task.block_size,
                       n_layer=size.n_layer, n_head=size.n_head, n_embd=size.n_embd, causal=task.causal)
    return GPT(config, seed)


def pretrain(task_name: str = "add", steps: int = 1500, out: str | Path | None = None,
             size: ModelSize | None = None, batch_size: int = 64, lr: float = PRETRAIN_LR, seed: int = 0,
             text_file: str | None = None, progress: bool = True):
    """Train a base GPT from scratch on a language-modelling task (or a mixture); optionally save it.

    Returns (model, report) where report holds the task's held-out metrics and the run time.
    """
    task = make_task(task_name, text_file)
    if task_name.split(",")[0] not in LM_TASKS:
        raise ValueError(f"pretrain trains a language model ({', '.join(LM_TASKS)}); {task_name!r} is a "
                         "fine-tuning task (use it as a target of `compare`)")
    model = build_model(task, size or ModelSize(), seed)
    config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=min(100, steps // 10),
                         eval_every=0, seed=seed)
    start = time.perf_counter()
    history = train(model, task.batch_fn(batch_size), config, progress=progress, label=f"pretrain {task_name}")
    report = {"task": task_name, "steps": steps, "final_loss": history[-1]["loss"],
              "train_seconds": time.perf_counter() - start, "parameters": model.num_parameters(),
              **task.evaluate(model)}
    if out is not None:
        out = Path(out)
        save_model(out, model, {"task": task_name, "text_file": text_file,
                                "tokenizer": task.data.tokenizer.to_dict(), "report": report})
        save_history_csv(history, out / "history.csv")
    return model, report


def default_source(target: str) -> str:
    """The pretraining task of the base a target is fine-tuned from (arithmetic: "add,sub")."""
    return DEFAULT_SOURCE.get(target, "add,sub")
