"""Floor 8: the main job. Full fine-tuning, LoRA and PiSSA, side by side.

One base model is pretrained on a source task (or reused from a cache), then three copies of
it are fine-tuned on a shifted target task with the same data, seed, steps and schedule. For
each method we measure what matters: trainable parameters, the size of the file you would
share, optimizer state, the peak memory and time of a step, the target metric before and after,
and how much of the source task survives (forgetting).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .checkpoint import load_model, save_model
from .io import file_size, load_json, save_json
from .memory import analytic_step_memory, measure_step
from .models import GPTForSequenceClassification
from .optim import AdamW
from .peft import LoraConfig, get_peft_model
from .recipes import ModelSize, Task, make_task, pretrain
from .train import TrainConfig, default_loss, save_history_csv, train

METHODS = ("full", "lora", "pissa")
# Learning rates from a sweep on the default tasks (add -> sub): at 1000 steps full fine-tuning
# reached 100% at 1e-3 and LoRA 100% at 5e-3 (64% at 2e-3); at 600 steps PiSSA reached 85% at
# 3e-3 but 16% at 1e-2, and 99.8% at 2e-3 with 1000 steps. Notebook 4 compares LoRA and PiSSA
# at equal learning rates.
DEFAULT_LR = {"full": 1e-3, "lora": 5e-3, "pissa": 2e-3}


@dataclass
class CompareConfig:
    source: str = "add"           # pretraining task
    target: str = "sub"           # fine-tuning task ("sum" for classification)
    methods: tuple = METHODS
    r: int = 8
    lora_alpha: float = 16
    target_modules: tuple | str = "all-linear"  # every Linear but the head, as QLoRA advises
    steps: int = 1000
    batch_size: int = 64
    lr: dict = field(default_factory=dict)    # per method; missing ones use DEFAULT_LR
    seed: int = 0
    base_steps: int = 1500
    size: ModelSize = field(default_factory=ModelSize)
    eval_every: int = 100
    eval_limit: int = 500         # held-out problems per evaluation during training
    out: str = "runs/compare"
    cache: str = "runs/cache"

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
        if self.source == self.target:
            raise ValueError(f"source and target are both {self.source!r}: fine-tuning needs a shifted task")
        bad = [m for m, lr in self.lr.items() if m not in METHODS or not lr > 0]
        if bad:
            raise ValueError(f"bad learning rate for {bad}: give a positive lr for one of {METHODS}")

    def lr_for(self, method: str) -> float:
        return self.lr.get(method, DEFAULT_LR[method])


def base_model(cfg: CompareConfig, progress: bool = True):
    """The pretrained base, from the cache when an identical one was trained before."""
    s = cfg.size
    folder = Path(cfg.cache) / f"base-{cfg.source}-L{s.n_layer}-H{s.n_head}-d{s.n_embd}-steps{cfg.base_steps}-seed{cfg.seed}"
    if (folder / "model.npz").is_file():
        meta = load_json(folder / "config.json")
        print(f"reusing the base model in {folder} (source accuracy {meta['report'].get('accuracy', float('nan')):.1%})")
        return folder
    print(f"pretraining a base model on '{cfg.source}' ({cfg.base_steps} steps); it will be cached in {folder}")
    _, report = pretrain(cfg.source, cfg.base_steps, folder, s, cfg.batch_size, seed=cfg.seed,
                         progress=progress)
    print(f"base model: source accuracy {report.get('accuracy', float('nan')):.1%} "
          f"after {report['train_seconds']:.0f}s")
    return folder


def prepare(method: str, base_dir, target: Task, cfg: CompareConfig):
    """A fresh copy of the base, ready for ``method`` (wrapped with adapters, or not)."""
    model, _ = load_model(base_dir)
    if target.is_classification:  # a new head on the same body, trained by every method
        body = model
        model = GPTForSequenceClassification(body.config, target.data.n_classes, cfg.seed)
        model.transformer.load_state_dict(body.state_dict())
    if method == "full":
        return model
    lora = LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, target_modules=cfg.target_modules,
                      init_lora_weights=True if method == "lora" else "pissa",
                      modules_to_save=("score",) if target.is_classification else None)
    return get_peft_model(model, lora, seed=cfg.seed)


def language_model(model):
    """The part of a model that writes text (a classifier's body keeps its LM head)."""
    inner = getattr(model, "base_model", model)
    return inner.transformer if isinstance(inner, GPTForSequenceClassification) else model


def step_memory(method, base_dir, target, cfg):
    """Measure one step on a throwaway copy (a step changes the weights)."""
    model = prepare(method, base_dir, target, cfg)
    optimizer = AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-9)
    batch = target.batch_fn(cfg.batch_size)(np.random.default_rng(cfg.seed))
    measure_step(model, batch, default_loss, optimizer)  # warm-up: creates the optimizer state
    measured = measure_step(model, batch, default_loss, optimizer)
    lora_ranks = [layer.r for _, layer in model.lora_layers()] if method != "full" else []
    seq_len = batch[0].shape[1]
    analytic = analytic_step_memory(
        language_model(model).config, cfg.batch_size, seq_len, model.num_parameters(),
        model.num_parameters(trainable_only=True), lora_ranks,
        target.data.n_classes if target.is_classification else None)
    return measured.to_dict(), analytic


def run_method(method, base_dir, source, target, cfg, out, progress=True) -> dict:
    model = prepare(method, base_dir, target, cfg)
    trainable, total = model.num_parameters(trainable_only=True), model.num_parameters()
    before = target.evaluate(model)[target.metric]
    source_before = source.evaluate(language_model(model))[source.metric]
    train_cfg = TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr_for(method),
                            warmup_steps=cfg.steps // 10, weight_decay=0.0,
                            eval_every=cfg.eval_every, seed=cfg.seed)
    evaluate = lambda m: {f"target_{k}": v for k, v in target.evaluate(m, cfg.eval_limit).items()}
    history = train(model, target.batch_fn(cfg.batch_size), train_cfg, eval_fn=evaluate,
                    progress=progress, label=f"{method:>5}")
    folder = out / method
    if method == "full":
        shared = save_model(folder / "model", model) / "model.npz"
    else:
        shared = model.save_pretrained(folder / "adapter") / "adapter_model.npz"
    after = target.evaluate(model)
    source_after = source.evaluate(language_model(model))[source.metric]
    measured, analytic = step_memory(method, base_dir, target, cfg)
    return {
        "method": method, "lr": cfg.lr_for(method), "trainable_params": trainable,
        "all_params": total, "trainable_percent": 100 * trainable / total,
        "file": str(shared.relative_to(out)), "file_bytes": file_size(shared),
        "optimizer_state_bytes": measured["optimizer_state"], "memory": measured,
        "memory_analytic": analytic,
        "ms_per_step": float(np.median([h["ms"] for h in history])),
        "target_before": before, "target_after": after[target.metric], "target_metrics": after,
        "source_before": source_before, "source_after": source_after,
        "history": history,
    }


def compare(cfg: CompareConfig, progress: bool = True) -> dict:
    """Run every method of ``cfg`` and write results.json, history.csv and plots to cfg.out.
    Returns the results, each run with its per-step ``history``, and the printable ``table``."""
    from .plots import plot_comparison  # matplotlib is only needed here

    start = time.perf_counter()
    out = Path(cfg.out)
    source, target = make_task(cfg.source), make_task(cfg.target)
    if source.is_classification:
        raise ValueError("the source task is pretrained as a language model; 'sum' can only be a target")
    base_dir = base_model(cfg, progress)
    runs = [run_method(m, base_dir, source, target, cfg, out, progress) for m in cfg.methods]
    results = {"config": {**asdict(cfg), "lr": {m: cfg.lr_for(m) for m in cfg.methods}},
               "target_metric": target.metric, "source_metric": source.metric,
               "seconds": time.perf_counter() - start, "runs": runs}
    summary = {**results, "runs": [{k: v for k, v in run.items() if k != "history"} for run in runs]}
    save_json(out / "results.json", json.loads(json.dumps(summary, default=float)))  # history: CSV
    save_history_csv([{"method": run["method"], **h} for run in runs for h in run["history"]],
                     out / "history.csv")
    results["plots"] = [str(p) for p in plot_comparison(runs, target.metric, out)]
    results["table"] = format_table(results)
    return results


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def format_table(results: dict) -> str:
    metric = results["target_metric"]
    head = ["method", "trainable", "%", "file", "optimizer", "peak step", "ms/step",
            f"target {metric}", f"source {results['source_metric']}"]
    rows = [head]
    for r in results["runs"]:
        rows.append([r["method"], f"{r['trainable_params']:,}", f"{r['trainable_percent']:.2f}",
                     _mib(r["file_bytes"]), _mib(r["optimizer_state_bytes"]),
                     _mib(r["memory"]["measured_peak"]), f"{r['ms_per_step']:.1f}",
                     f"{r['target_before']:.3f} -> {r['target_after']:.3f}",
                     f"{r['source_before']:.3f} -> {r['source_after']:.3f}"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
