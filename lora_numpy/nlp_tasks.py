"""Floor 8 (beside recipes.py): the tasks interviews ask about, on text, fine-tuned by hand.

    ner        character-level BIO tagging of a synthetic corpus        TOKEN_CLS   entity F1
    translate  English -> French number words, prompt + response (SFT)  CAUSAL_LM   exact match, chrF
    docs       which documentation section a stdlib paragraph is from   SEQ_CLS     macro-F1

The task objects (``NERTask``, ``TranslateTask``, ``DocsTask``) are ``tasks.Task``s, the same
interface as the arithmetic tasks, and ``compare --target ner|translate|docs`` runs them through
the fair side-by-side protocol. This module is the short path the notebook takes: a base
pretrained on the standard library's documentation, as a decoder (next token, ``causal=True``)
or an encoder (masked LM, :func:`pretrain_mlm`), then one method, one learning rate, one seed.

LoRA adapts the Linear layers of the blocks; the head a task adds is new, so it trains in full
and is saved with the adapter (``modules_to_save``, from ``TASK_TYPES``).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

from .models import GPT
from .peft import LoraConfig, get_peft_model
from .recipes import ModelSize, pretrain
from .tasks import TASK_TYPES, DocsTask, NERTask, TranslateTask
from .train import TrainConfig, train

__all__ = ["ADAPTED_MODULES", "DEFAULT_LR", "DocsTask", "FinetuneResult", "METHODS", "NERTask", "NLP_TASK_NAMES",
           "TASK_TYPES", "TranslateTask", "finetune", "lora_config", "prepare", "pretrain_base", "pretrain_mlm"]

NLP_TASK_NAMES = ("ner", "translate", "docs")
METHODS = ("full", "lora", "pissa")
# Every Linear of the blocks, the same set "all-linear" picks (it skips the heads lm_head, score and
# classifier), spelled out so that configs and tables name the layers.
ADAPTED_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


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
                  progress: bool = True):
    """A base pretrained on the stdlib documentation in the text tasks' vocabulary: a decoder by
    next-token prediction (``pretrain --task causal``), or an encoder by masked LM (``--task mlm``).
    Returns (GPT, report dict with final_loss, val_loss, train_seconds); saved to ``out`` if given."""
    return pretrain("causal" if causal else "mlm", steps, out, size, batch_size, lr, seed, progress=progress)


def pretrain_mlm(steps: int = 600, **kwargs):
    """``pretrain --task mlm``: an encoder (causal=False) pretrained by BERT's masked LM."""
    return pretrain_base(causal=False, steps=steps, **kwargs)


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
