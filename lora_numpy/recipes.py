"""Floor 8: named tasks, model sizes, and pretraining.

The tasks share one character vocabulary, so one base model can be pretrained on source skills
and fine-tuned on a target task:

    add      "07+35=042"  exact-match accuracy by greedy decoding
    sub      "35-07=28"   exact-match accuracy
    mul      "07*35=0245" exact-match accuracy
    absdiff  "07|35=28"   |a - b|, exact-match accuracy (the main job's new skill)
    sum      "07+35" -> sum<66 | 66<=sum<133 | sum>=133              (sequence classification)
    text     the standard library's documentation, or --text-file   (language modelling)

A comma joins arithmetic skills into one mixture: ``make_task("add,sub")`` trains on both and
reports each skill's accuracy (``accuracy_add``, ``accuracy_sub``) beside their mean.
A new task is one entry in ``TASKS``: a function returning its data, metric and evaluation.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .checkpoint import save_model
from .data import (ArithmeticTask, SkillMixture, SumClassificationTask, TextDataset, load_text_file,
                   stdlib_docs_text)
from .evaluate import classification_metrics, exact_match_accuracy, mean_loss
from .models import GPT, GPTConfig, GPTForSequenceClassification
from .train import TrainConfig, save_history_csv, train

ARITHMETIC_OPS = {"add": "+", "sub": "-", "mul": "*", "absdiff": "|"}
VAL_FRACTION = 0.1  # held out of training for choices (learning rates); the test split is untouched
PRETRAIN_LR = 3e-3  # peak learning rate of `pretrain` (and of the cached base models)


@dataclass
class Task:
    """A task as the training loop and the reports see it.

    evaluate_fn(model, split, limit) -> dict of metrics with ``metric`` among them."""
    name: str
    data: object            # ArithmeticTask, SkillMixture, SumClassificationTask or TextDataset
    metric: str             # the headline number: "accuracy" or "val_loss"
    block_size: int
    evaluate_fn: Callable

    @property
    def vocab_size(self) -> int:
        return self.data.tokenizer.vocab_size

    @property
    def is_classification(self) -> bool:
        return isinstance(self.data, SumClassificationTask)

    @property
    def skills(self) -> list:
        """The names of the skills scored one by one (a mixture's parts, else the task itself)."""
        return list(self.data.tasks) if isinstance(self.data, SkillMixture) else [self.name]

    def batch_fn(self, batch_size: int):
        if isinstance(self.data, TextDataset):
            return lambda rng: self.data.get_batch("train", batch_size, self.block_size, rng)
        return lambda rng: self.data.get_batch("train", batch_size, rng)

    def evaluate(self, model, limit: int | None = None, split: str = "test") -> dict:
        """The headline metric on held-out data ("test", or "val" for choices), plus the rest."""
        return self.evaluate_fn(model, split, limit)


def _arithmetic(name: str, max_train: int | None = None) -> Task:
    data = ArithmeticTask(ARITHMETIC_OPS[name], n_digits=2, val_fraction=VAL_FRACTION, max_train=max_train)
    evaluate = lambda model, split, limit: {"accuracy": exact_match_accuracy(model, data, split, limit)}
    return Task(name, data, "accuracy", data.seq_len, evaluate)


def _mixture(names: list, max_train: int | None = None) -> Task:
    data = SkillMixture({n: _arithmetic(n, max_train).data for n in names})

    def evaluate(model, split, limit):
        scores = {f"accuracy_{n}": exact_match_accuracy(model, t, split, limit) for n, t in data.tasks.items()}
        return {"accuracy": float(np.mean(list(scores.values()))), **scores}
    return Task(",".join(names), data, "accuracy", data.seq_len, evaluate)


def _sum(max_train: int | None = None) -> Task:
    data = SumClassificationTask(n_digits=2, val_fraction=VAL_FRACTION, max_train=max_train)

    def evaluate(model, split, limit):
        report = classification_metrics(model, data, split)
        return {k: report[k] for k in ("accuracy", "macro_f1", "macro_precision", "macro_recall")}
    return Task("sum", data, "accuracy", data.seq_len, evaluate)


def _text(text_file: str | None = None) -> Task:
    data = TextDataset(load_text_file(text_file) if text_file else stdlib_docs_text())

    def evaluate(model, split, limit):
        rng = np.random.default_rng(0)  # the same validation windows every time
        batches = [data.get_batch("val", 32, 64, rng) for _ in range(8)]
        return {"val_loss": mean_loss(model, batches)}
    return Task("text", data, "val_loss", 64, evaluate)


# name -> factory(max_train, text_file) -> Task; one entry per task
TASKS = {**{name: (lambda max_train, text_file, name=name: _arithmetic(name, max_train)) for name in ARITHMETIC_OPS},
         "sum": lambda max_train, text_file: _sum(max_train),
         "text": lambda max_train, text_file: _text(text_file)}
TASK_NAMES = tuple(TASKS)
LM_TASKS = tuple(n for n in TASK_NAMES if n != "sum")  # what `pretrain` can train


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


def build_model(task: Task, size: ModelSize, seed: int = 0, num_labels: int | None = None):
    config = GPTConfig(vocab_size=task.vocab_size, block_size=task.block_size,
                       n_layer=size.n_layer, n_head=size.n_head, n_embd=size.n_embd)
    if num_labels is not None:
        return GPTForSequenceClassification(config, num_labels, seed)
    return GPT(config, seed)


def pretrain(task_name: str = "add", steps: int = 1500, out: str | Path | None = None,
             size: ModelSize | None = None, batch_size: int = 64, lr: float = PRETRAIN_LR, seed: int = 0,
             text_file: str | None = None, progress: bool = True):
    """Train a base GPT from scratch on a language-modelling task (or a mixture); optionally save it.

    Returns (model, report) where report holds the task's held-out metrics and the run time.
    """
    task = make_task(task_name, text_file)
    if task.is_classification:
        raise ValueError("pretrain trains a language model; 'sum' is a fine-tuning task "
                         "(use it as a target of `compare`)")
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
