"""Floor 7: one training loop for every method (full fine-tuning, LoRA, PiSSA, pretraining).

A step is: learning rate from the schedule, a batch, forward, backward, clip, optimizer step.
Only parameters with ``requires_grad`` reach the optimizer, so the same loop trains a whole
model or just its adapters. Everything random (batches, dropout masks) comes from generators
whose state a checkpoint saves, so a resumed run continues exactly where it stopped.
"""
from __future__ import annotations

import csv
import io
import math
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from .io import atomic_write
from .nn import Dropout, Module
from .optim import AdamW, clip_grad_norm_, cosine_schedule, param_groups_for_weight_decay, set_lr
from .checkpoint import load_train_state, save_train_state, saved_train_config


@dataclass
class TrainConfig:
    steps: int = 2000           # optimizer steps in the whole run (the schedule spans them)
    batch_size: int = 64
    lr: float = 3e-3            # peak learning rate, reached after warmup
    warmup_steps: int = 100     # linear warmup: early gradients are large and noisy
    min_lr: float | None = None  # end of the cosine decay; None means lr / 10
    weight_decay: float = 0.1   # AdamW's decoupled decay, on matrices only
    grad_clip: float = 1.0      # clip the global gradient norm to this (0 disables)
    eval_every: int = 250       # steps between evaluations (0: only at the end)
    seed: int = 0               # seeds the batch sampler

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps={self.steps}], got {self.warmup_steps}")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; nothing was saved after that step."""


class Progress:
    """A one-line progress bar on stderr that redraws in place (a terminal or a notebook both
    honour the carriage return), at most a few times a second so saved notebooks stay small."""

    def __init__(self, total: int, label: str = "", enabled: bool = True, every_s: float = 0.5):
        self.total, self.label, self.enabled, self.every_s = total, label, enabled, every_s
        self.start = self.last = time.perf_counter()
        self.interactive = sys.stderr.isatty()

    def update(self, done: int, text: str = "") -> None:
        now = time.perf_counter()
        final = done >= self.total
        if not self.enabled or (now - self.last < self.every_s and not final):
            return
        if not self.interactive and not final and now - self.last < 10 * self.every_s:
            return  # in a log file, a line every few seconds is plenty
        self.last = now
        frac = done / self.total
        eta = (now - self.start) / max(frac, 1e-9) * (1 - frac)
        bar = "#" * int(24 * frac) + "-" * (24 - int(24 * frac))
        line = f"{self.label} [{bar}] {done}/{self.total} {text} eta {eta:4.0f}s"
        end = "\n" if final or not self.interactive else ""
        print("\r" + line, end=end, file=sys.stderr, flush=True)


def default_loss(model: Module, batch):
    """A batch is the model's positional inputs, targets last: ``model(*batch)`` gives the loss."""
    return model(*batch)[1]


def dropout_generators(model: Module) -> list:
    """The distinct generators behind the model's dropout masks, in a fixed order."""
    seen, gens = set(), []
    for _, module in model.named_modules():
        if isinstance(module, Dropout) and id(module.rng) not in seen:
            seen.add(id(module.rng))
            gens.append(module.rng)
    return gens


def _check_optimizer(optimizer, named: list) -> None:
    """A caller's optimizer must update exactly the trainable parameters, no more, no fewer."""
    given = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [n for n, p in named if id(p) not in given]
    extra = len(given - {id(p) for _, p in named})
    if missing or extra:
        raise ValueError(f"optimizer must cover exactly the parameters that require grad: "
                         f"missing {missing}, {extra} other tensor(s) in its groups")


def _check_resume(checkpoint_dir, config: TrainConfig, override_config: bool, end: int) -> None:
    """Refuse, before anything loads, to resume under another config or to rewind a run."""
    step, saved = saved_train_config(checkpoint_dir)
    current = asdict(config)
    changed = [f"{f.name}: saved {saved.get(f.name)!r}, now {current[f.name]!r}"
               for f in fields(config) if saved.get(f.name) != current[f.name]]
    if changed and not override_config:
        raise ValueError(f"the run in {checkpoint_dir} was saved with another training config "
                         f"({'; '.join(changed)}); pass the same config, or "
                         "override_config=True to continue under the new one")
    if step > end:
        raise ValueError(f"the checkpoint in {checkpoint_dir} is at step {step}, past the "
                         f"requested end {end}; resuming would rewrite it as an earlier step "
                         "(raise steps/stop_at, or use another checkpoint_dir)")


def train(model: Module, batch_fn, config: TrainConfig, *, loss_fn=default_loss, eval_fn=None,
          checkpoint_dir=None, resume: bool = False, override_config: bool = False,
          stop_at: int | None = None, optimizer=None, progress: bool = True,
          label: str = "train") -> list:
    """Train the parameters of ``model`` that require grad; return the per-step history.

    batch_fn(rng) -> batch; loss_fn(model, batch) -> scalar loss Tensor;
    eval_fn(model) -> dict of metrics, run every ``config.eval_every`` steps and at the end.
    checkpoint_dir: where the final state is saved (and read from, with ``resume=True``).
    resume: continue the run saved there; it must have been saved with the same ``config``
    (a difference is refused, naming the fields) unless ``override_config=True``.
    stop_at: stop after this step (the schedule still spans ``config.steps``), e.g. to resume later.
    optimizer: one built by the caller over exactly the trainable parameters (e.g. LoRA+'s
    groups with their own learning rates); default AdamW(lr=config.lr) with weight decay on
    matrices only. The schedule scales every group's own starting lr by
    ``schedule(step) / config.lr``, so the ratios between groups stay fixed.
    History records: step, loss, lr, grad_norm, ms (forward+backward+update), and eval metrics.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("no parameter requires grad: nothing to train")
    end = config.steps if stop_at is None else min(stop_at, config.steps)
    if resume:
        if checkpoint_dir is None:
            raise ValueError("resume=True needs the checkpoint_dir of the run to continue")
        _check_resume(checkpoint_dir, config, override_config, end)
    trainable = [p for _, p in named]
    if optimizer is None:
        optimizer = AdamW(param_groups_for_weight_decay(named, config.weight_decay), lr=config.lr)
    else:
        _check_optimizer(optimizer, named)
    # Each group's own settings, read before a checkpoint's overwrite them: the schedule scales
    # these lrs, and override_config keeps these settings rather than the saved ones.
    own_settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    peak_lrs = [settings["lr"] for settings in own_settings]
    data_rng = np.random.default_rng(config.seed)
    min_lr = config.lr / 10 if config.min_lr is None else config.min_lr
    history, start = [], 0
    if resume:
        start, history = load_train_state(checkpoint_dir, model, optimizer, data_rng,
                                          dropout_generators(model))
        if override_config:
            for group, settings in zip(optimizer.param_groups, own_settings):
                group.update(settings)
    bar = Progress(end, label, enabled=progress)
    model.train()
    for step in range(start, end):
        lr = cosine_schedule(step, config.steps, config.lr, config.warmup_steps, min_lr)
        set_lr(optimizer, [lr * (peak / config.lr) for peak in peak_lrs])  # ratio 1.0: exactly lr
        batch = batch_fn(data_rng)
        t0 = time.perf_counter()
        loss = loss_fn(model, batch)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise TrainingDiverged(
                f"loss became {loss_value} at step {step + 1}: lower the learning rate "
                f"(now {lr:.3g}) or clip gradients harder (grad_clip={config.grad_clip}); "
                "nothing was saved after this step")
        optimizer.zero_grad()
        loss.backward()
        norm = clip_grad_norm_(trainable, config.grad_clip if config.grad_clip > 0 else math.inf)
        optimizer.step()
        record = {"step": step + 1, "loss": loss_value, "lr": lr, "grad_norm": norm,
                  "ms": 1000 * (time.perf_counter() - t0)}
        if eval_fn is not None and ((config.eval_every and (step + 1) % config.eval_every == 0)
                                    or step + 1 == config.steps):
            model.eval()
            record.update(eval_fn(model))
            model.train()
        history.append(record)
        bar.update(step + 1, f"loss {loss_value:.4f}")
    if checkpoint_dir is not None and (end > start or not resume):  # nothing new: files stay
        save_train_state(checkpoint_dir, model, optimizer, data_rng, dropout_generators(model),
                         end, history, asdict(config))
    return history


def save_history_csv(history: list, path) -> Path:
    """One row per step; eval columns are empty on steps without an evaluation. Written
    atomically: a crash leaves the previous file, never a torn one."""
    columns = list(dict.fromkeys(k for record in history for k in record))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(history)
    return atomic_write(path, lambda f: f.write(text.getvalue().encode("utf-8")))
