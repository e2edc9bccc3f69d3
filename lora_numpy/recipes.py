"""Floor 8: named tasks, the default base model, and pretraining.

The tasks share one character vocabulary, so one base model can be pretrained on a source task
and fine-tuned on a target task:

    add   "07+35=042"  exact-match accuracy by greedy decoding   (the default source task)
    sub   "35-07=28"   exact-match accuracy                      (the default target task)
    mul   "07*35=0245" exact-match accuracy
    sum   "07+35" -> sum<66 | 66<=sum<133 | sum>=133              (sequence classification)
    text  the standard library's documentation, or --text-file   (language modelling)
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checkpoint import save_model
from .data import ArithmeticTask, SumClassificationTask, TextDataset, load_text_file, stdlib_docs_text
from .evaluate import classification_metrics, exact_match_accuracy, mean_loss
from .models import GPT, GPTConfig, GPTForSequenceClassification
from .train import TrainConfig, save_history_csv, train

ARITHMETIC_OPS = {"add": "+", "sub": "-", "mul": "*"}
TASK_NAMES = (*ARITHMETIC_OPS, "sum", "text")


@dataclass
class Task:
    """A task as the training loop and the reports see it."""
    name: str
    data: object            # ArithmeticTask, SumClassificationTask or TextDataset
    metric: str             # the headline number: "accuracy" or "val_loss"
    block_size: int

    @property
    def vocab_size(self) -> int:
        return self.data.tokenizer.vocab_size

    @property
    def is_classification(self) -> bool:
        return isinstance(self.data, SumClassificationTask)

    def batch_fn(self, batch_size: int):
        if isinstance(self.data, TextDataset):
            return lambda rng: self.data.get_batch("train", batch_size, self.block_size, rng)
        return lambda rng: self.data.get_batch("train", batch_size, rng)

    def evaluate(self, model, limit: int | None = None) -> dict:
        """The headline metric on held-out data, plus the task's other measures."""
        if isinstance(self.data, ArithmeticTask):
            return {"accuracy": exact_match_accuracy(model, self.data, "test", limit)}
        if self.is_classification:
            report = classification_metrics(model, self.data, "test")
            return {"accuracy": report["accuracy"], "macro_f1": report["macro_f1"],
                    "macro_precision": report["macro_precision"], "macro_recall": report["macro_recall"]}
        rng = np.random.default_rng(0)  # the same validation windows every time
        batches = [self.data.get_batch("val", 32, self.block_size, rng) for _ in range(8)]
        return {"val_loss": mean_loss(model, batches)}


def make_task(name: str, text_file: str | None = None) -> Task:
    if name in ARITHMETIC_OPS:
        data = ArithmeticTask(ARITHMETIC_OPS[name], n_digits=2)
        return Task(name, data, "accuracy", data.seq_len)
    if name == "sum":
        data = SumClassificationTask(n_digits=2)
        return Task(name, data, "accuracy", data.seq_len)
    if name == "text":
        text = load_text_file(text_file) if text_file else stdlib_docs_text()
        return Task(name, TextDataset(text), "val_loss", 64)
    raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASK_NAMES)}")


@dataclass
class ModelSize:
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64


def build_model(task: Task, size: ModelSize, seed: int = 0, num_labels: int | None = None):
    config = GPTConfig(vocab_size=task.vocab_size, block_size=task.block_size,
                       n_layer=size.n_layer, n_head=size.n_head, n_embd=size.n_embd)
    if num_labels is not None:
        return GPTForSequenceClassification(config, num_labels, seed)
    return GPT(config, seed)


def pretrain(task_name: str = "add", steps: int = 1500, out: str | Path | None = None,
             size: ModelSize | None = None, batch_size: int = 64, lr: float = 3e-3, seed: int = 0,
             text_file: str | None = None, progress: bool = True):
    """Train a base GPT from scratch on a language-modelling task; optionally save it.

    Returns (model, report) where report holds the task's held-out metric and the run time.
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
