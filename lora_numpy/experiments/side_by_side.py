"""Floor 8: the main job. Full fine-tuning, LoRA and PiSSA, side by side, made fair.

One base model is pretrained on a mixture of source skills (or reused from a cache), then copies
of it are fine-tuned on a new target skill. Every method gets the same data, steps and schedule;
only its learning rate is its own, chosen from a small grid by short runs scored on the
validation split. Each outcome is repeated over several seeds and reported as mean [min-max]:
the target metric, the steps to reach 90% on it, and how much of each source skill survives,
with the adapter on and (LoRA, PiSSA) switched off.

The text targets (``ner``, ``translate``, ``docs``) go through the same protocol from a base
pretrained on the standard library's documentation (an encoder by masked LM for ``ner``, a
decoder otherwise); what the base keeps is its held-out text loss, adapter on and off.
``config_for(target)`` gives each target's default schedule.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from ..checkpoint import load_model, save_model
from ..io import file_size, load_json, save_json
from ..memory import StepMemory, measure_step
from ..nlp_tasks import ADAPTED_MODULES
from ..optim import AdamW
from ..peft import LoraConfig
from ..recipes import (ARITHMETIC_OPS, PRETRAIN_LR, TEXT_TARGETS, VAL_FRACTION, ModelSize, TextTask,
                       default_source, make_task, pretrain)
from ..tasks import TASK_TYPES, Task
from ..train import TrainConfig, default_loss, save_history_csv, train
from .methods import DEFAULT_METHODS, METHODS, Method, count_parameters
from .protocol import LrChoice, Spread, aggregate, choose_lr, steps_to_reach



def _default_lora() -> LoraConfig:
    return LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")  # every Linear but the head


def _default_train() -> TrainConfig:  # lr is chosen per method; everything else is shared
    return TrainConfig(steps=400, batch_size=64, warmup_steps=40, weight_decay=0.0, eval_every=50)


@dataclass
class CompareConfig:
    source: str | None = None      # what the base is pretrained on (None: default_source(target),
                                   # the skills "add,sub", or "mlm" / "causal" for a text target)
    target: str = "absdiff"        # the new skill every method learns ("sum": classification)
    methods: tuple = DEFAULT_METHODS  # any of METHODS
    lora: LoraConfig = field(default_factory=_default_lora)
    train: TrainConfig = field(default_factory=_default_train)
    seeds: tuple = (0, 1, 2)       # fine-tuning seeds (batches, adapter init); the base is one
    lr: dict = field(default_factory=dict)  # method -> a fixed learning rate, skipping its grid
    grid_steps: int = 150          # length of each short run of the learning-rate grid
    max_train: int | None = None   # target training examples (None: all; the low-data study: few)
    base_steps: int = 3000          # the mixture needs ~2500 steps for "-" (measured: 94% at 2000)
    size: ModelSize = field(default_factory=ModelSize)
    eval_limit: int = 300          # test problems per evaluation during training (curves only)
    out: str = "runs/compare"
    cache: str = "runs/cache"

    def __post_init__(self):
        self.source = self.source or default_source(self.target)
        if self.target in TEXT_TARGETS:
            bases = ("causal",) if self.target == "translate" else ("mlm", "causal")
            if self.source not in bases:
                raise ValueError(f"the text target {self.target!r} is fine-tuned from a base pretrained on "
                                 f"text: source {' or '.join(bases)}, got {self.source!r}")
        elif not set(self.source.split(",")) <= set(ARITHMETIC_OPS):
            raise ValueError(f"the source of {self.target!r} must be arithmetic skills (e.g. add,sub), "
                             f"got {self.source!r}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
        if set(self.source.split(",")) & {self.target}:
            raise ValueError(f"the target {self.target!r} is among the source skills {self.source!r}: "
                             "fine-tuning needs a new skill")
        bad = [m for m, lr in self.lr.items() if m not in METHODS or not lr > 0]
        if bad:
            raise ValueError(f"bad learning rate for {bad}: give a positive lr for one of {list(METHODS)}")
        if not self.seeds or self.grid_steps < 1:
            raise ValueError(f"need at least one seed and grid_steps >= 1, got {self.seeds}, {self.grid_steps}")


# The text targets' defaults, sized so that one default run (base pretraining included) takes at
# most ~240 s of one CPU core: short runs, one evaluation at the end, the three core methods.
TEXT_DEFAULTS = {
    "ner": dict(steps=250, grid_steps=80, batch_size=32, base_steps=600),
    "translate": dict(steps=150, grid_steps=50, batch_size=32, base_steps=600),
    "docs": dict(steps=200, grid_steps=80, batch_size=32, base_steps=600),
}


def config_for(target: str = "absdiff", **changes) -> CompareConfig:
    """The default comparison on ``target`` with ``changes``: CompareConfig's defaults, or for a
    text target the schedule of TEXT_DEFAULTS, the blocks' Linears adapted (the new head is
    trained in full instead, modules_to_save) and full / LoRA / PiSSA."""
    if target not in TEXT_DEFAULTS:
        return CompareConfig(target=target, **changes)
    d = TEXT_DEFAULTS[target]
    train = replace(_default_train(), steps=d["steps"], batch_size=d["batch_size"], warmup_steps=d["steps"] // 10,
                    eval_every=d["steps"])
    defaults = dict(target=target, train=train, grid_steps=d["grid_steps"], base_steps=d["base_steps"],
                    methods=("full", "lora", "pissa"), lora=replace(_default_lora(), target_modules=ADAPTED_MODULES),
                    eval_limit=30)
    return CompareConfig(**{**defaults, **changes})


def base_settings(cfg: CompareConfig) -> dict:
    """Everything that changes the base model: its cache key (a text base adds its context, its
    kind and a digest of the text, which changes a little between Python versions)."""
    source = make_task(cfg.source)
    settings = {"source": cfg.source, "size": asdict(cfg.size), "steps": cfg.base_steps,
                "batch_size": cfg.train.batch_size, "lr": PRETRAIN_LR, "seed": 0,
                "vocabulary": source.data.tokenizer.chars, "val_fraction": VAL_FRACTION}
    if isinstance(source, TextTask):
        tokens = np.concatenate([source.data.train_tokens, source.data.val_tokens])
        settings.update(block_size=source.block_size, causal=source.causal,
                        mask_token=source.data.tokenizer.mask_token,
                        text_sha256=hashlib.sha256(tokens.tobytes()).hexdigest())
    return settings


def base_model(cfg: CompareConfig, progress: bool = True) -> Path:
    """The pretrained base's folder, from the cache when an identical one was trained before; its
    config.json holds the pretraining report (held-out accuracy per skill)."""
    settings = base_settings(cfg)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    s = cfg.size
    folder = Path(cfg.cache) / f"base-{cfg.source.replace(',', '+')}-L{s.n_layer}-d{s.n_embd}-{digest}"
    if (folder / "model.npz").is_file():
        print(f"reusing the base model in {folder}")
        return folder
    print(f"pretraining a base model on '{cfg.source}' ({cfg.base_steps} steps); it will be cached in {folder}")
    pretrain(cfg.source, cfg.base_steps, folder, s, cfg.train.batch_size, seed=0, progress=progress)
    return folder


def prepare(method: Method, base_dir, target: Task, lora: LoraConfig, seed: int):
    """A fresh copy of the base, made into the target's model (a new head for a classifier,
    trained by every method: PEFT's modules_to_save of its task type), ready for ``method``."""
    model = target.make_model(load_model(base_dir)[0], seed)
    lora = replace(lora, modules_to_save=TASK_TYPES[target.task_type].modules_to_save)
    return method.build(model, lora, seed)


HEAD_MODELS = tuple(t.model_class for t in TASK_TYPES.values() if t.model_class is not None)


def language_model(model):
    """The part of a model that writes text (a classifier's body keeps its LM head)."""
    inner = getattr(model, "base_model", model)
    return inner.transformer if isinstance(inner, HEAD_MODELS) else model


def source_scores(source: Task, model) -> dict:
    """Each source skill's held-out accuracy: {"add": ..., "sub": ...} (a text base: {"mlm": loss})."""
    scores = source.evaluate(language_model(model))
    if len(source.skills) == 1:
        return {source.name: scores[source.metric]}
    return {skill: scores[f"{source.metric}_{skill}"] for skill in source.skills}


@dataclass
class RunResult:
    """One method, one seed."""
    method: str
    seed: int
    lr: float
    target_before: float
    target_after: float
    steps_to_90: int | None          # None: never reached within the run
    source_after: dict               # skill -> accuracy, adapter on
    source_adapter_off: dict | None  # skill -> accuracy with disable_adapter() (None: full)
    ms_per_step: float
    history: list = field(repr=False)
    metrics: dict = field(default_factory=dict)  # every metric of the final test evaluation


def train_config(cfg: CompareConfig, lr: float, seed: int, steps: int | None = None) -> TrainConfig:
    """The shared schedule at ``lr`` (and, for the grid's short runs, fewer ``steps``)."""
    steps = steps or cfg.train.steps
    return replace(cfg.train, lr=lr, seed=seed, steps=steps,
                   warmup_steps=round(cfg.train.warmup_steps * steps / cfg.train.steps))


def run_method(method: Method, lr: float, seed: int, base_dir, source: Task, target: Task,
               cfg: CompareConfig, lora: LoraConfig | None = None, progress: bool = True) -> RunResult:
    """Fine-tune a fresh copy of the base with ``method`` at ``lr`` for one seed, and measure it."""
    lora = lora or cfg.lora
    model = prepare(method, base_dir, target, lora, seed)
    metric = f"target_{target.metric}"
    curve = lambda m: {metric: target.evaluate(m, cfg.eval_limit)[target.metric]}
    start = {"step": 0, **curve(model)}
    before = target.evaluate(model)[target.metric]
    config = train_config(cfg, lr, seed)
    history = train(model, target.batch_fn(cfg.train.batch_size), config, loss_fn=target.loss_fn,
                    optimizer=method.optimizer(model, config), eval_fn=curve, progress=progress,
                    label=f"{method.name:>8} seed {seed}")
    off = None
    if method.has_adapter:
        with model.disable_adapter():
            off = source_scores(source, model)
    final = target.evaluate(model)
    return RunResult(method.name, seed, lr, before, final[target.metric],
                     steps_to_reach(history, metric, target.reach), source_scores(source, model), off,
                     float(np.median([h["ms"] for h in history])), [start, *history], final)


def grid_score(method: Method, base_dir, target: Task, cfg: CompareConfig, lora: LoraConfig):
    """validation_score(lr) for ``choose_lr``: a short run, then the target metric on "val"."""
    def score(lr: float) -> float:
        model = prepare(method, base_dir, target, lora, cfg.seeds[0])
        config = replace(train_config(cfg, lr, cfg.seeds[0], cfg.grid_steps), eval_every=0)
        train(model, target.batch_fn(cfg.train.batch_size), config, loss_fn=target.loss_fn,
              optimizer=method.optimizer(model, config), progress=False)
        return target.evaluate(model, split="val")[target.metric]
    return score


def pick_lr(method: Method, base_dir, target: Task, cfg: CompareConfig, lora: LoraConfig | None = None) -> LrChoice:
    """The method's learning rate: the user's fixed one, or the best of its grid on validation."""
    if method.name in cfg.lr:
        return LrChoice((cfg.lr[method.name],), (), cfg.lr[method.name])  # fixed by the user: no grid
    return choose_lr(method.lr_grid, grid_score(method, base_dir, target, cfg, lora or cfg.lora))


@dataclass
class MethodSummary:
    """One method over all seeds: its learning-rate choice, its costs, its outcomes."""
    method: str
    lr: LrChoice
    trainable_params: int
    all_params: int
    file_bytes: int
    memory: StepMemory
    ms_per_step: float
    target: Spread
    steps_to_90: Spread | None       # over the seeds that reached 90%
    reached_90: int                  # how many seeds did
    source: dict                     # skill -> Spread, adapter on
    source_adapter_off: dict | None  # skill -> Spread, adapter off
    retained: Spread                 # per seed, the mean over skills (adapter on)
    metrics: dict = field(default_factory=dict)  # every final metric: name -> Spread (per class: mean list)


def summarize(method: Method, choice: LrChoice, runs: list, base_dir, target: Task, cfg: CompareConfig,
              out: Path, lora: LoraConfig | None = None) -> MethodSummary:
    """Aggregate the seeds, and measure what one copy costs: parameters, file, step memory."""
    model = prepare(method, base_dir, target, lora or cfg.lora, cfg.seeds[0])
    folder = out / method.name
    shared = (save_model(folder / "model", model) / "model.npz" if not method.has_adapter
              else model.save_pretrained(folder / "adapter") / "adapter_model.safetensors")
    optimizer = AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-9)
    batch = target.batch_fn(cfg.train.batch_size)(np.random.default_rng(0))
    measure_step(model, batch, default_loss, optimizer)  # warm-up: creates the optimizer state
    memory = measure_step(model, batch, default_loss, optimizer)
    reached = [r.steps_to_90 for r in runs if r.steps_to_90 is not None]
    per_skill = lambda key: {k: aggregate(getattr(r, key)[k] for r in runs) for k in runs[0].source_after}
    return MethodSummary(
        method.name, choice, model.num_parameters(trainable_only=True), count_parameters(model),
        file_size(shared), memory, float(np.median([r.ms_per_step for r in runs])),
        aggregate(r.target_after for r in runs), aggregate(reached) if reached else None, len(reached),
        per_skill("source_after"), per_skill("source_adapter_off") if method.has_adapter else None,
        aggregate(np.mean(list(r.source_after.values())) for r in runs), final_metrics(runs))


def final_metrics(runs) -> dict:
    """Each final metric over the seeds: a Spread, or for a per-class list the mean per class."""
    return {k: aggregate(r.metrics[k] for r in runs) if np.isscalar(v) else
            np.mean([r.metrics[k] for r in runs], axis=0).tolist() for k, v in runs[0].metrics.items()}


@dataclass
class CompareResults:
    config: CompareConfig
    base: dict                       # the base model's report (per-skill accuracy)
    target_metric: str
    target_before: float
    source_before: dict              # skill -> the base model's accuracy (a text base: its val_loss)
    summaries: list                  # MethodSummary per method
    runs: list = field(repr=False)   # RunResult per method and seed
    seconds: float = 0.0
    plots: list = field(default_factory=list)
    source_metric: str = "accuracy"  # "val_loss" for a text base (lower is better)
    class_names: tuple = ()          # the order of per-class metrics (docs)

    def to_json(self) -> dict:
        """Everything but the per-step histories (those go to history.csv)."""
        data = asdict(self)
        for run in data["runs"]:
            run.pop("history")
        return json.loads(json.dumps(data, default=str))  # the few non-JSON values (paths) as text


def compare(cfg: CompareConfig, progress: bool = True) -> CompareResults:
    """Choose each method's lr, run it over every seed, and write results.json, history.csv and
    the plots into cfg.out."""
    from ..plots import plot_comparison  # matplotlib is only needed here

    start = time.perf_counter()
    out = Path(cfg.out)
    source, target = make_task(cfg.source), make_task(cfg.target, max_train=cfg.max_train)
    base_dir = base_model(cfg, progress)
    base = load_json(base_dir / "config.json")["report"]
    source_before = source_scores(source, load_model(base_dir)[0])
    print(f"base model, held-out {source.metric} per source: "
          + ", ".join(f"{k} {v:.3f}" for k, v in source_before.items()))
    summaries, runs = [], []
    for name in cfg.methods:
        method = METHODS[name]
        choice = pick_lr(method, base_dir, target, cfg)
        print(f"{name:>5} lr on validation after {cfg.grid_steps} steps (* chosen): {choice}")
        method_runs = [run_method(method, choice.chosen, seed, base_dir, source, target, cfg, progress=progress)
                       for seed in cfg.seeds]
        runs += method_runs
        summaries.append(summarize(method, choice, method_runs, base_dir, target, cfg, out))
    results = CompareResults(cfg, base, target.metric, runs[0].target_before, source_before, summaries, runs,
                             source_metric=source.metric, class_names=tuple(target.class_names))
    results.seconds = time.perf_counter() - start
    results.plots = [str(p) for p in plot_comparison(results, out)]
    save_json(out / "results.json", results.to_json())
    save_history_csv([{"method": r.method, "seed": r.seed, **h} for r in runs for h in r.history],
                     out / "history.csv")
    return results


def _size(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _spreads(summary: MethodSummary, retained: str = "retained") -> dict:
    """The outcomes compared between methods: name -> Spread."""
    out = {"target": summary.target, retained: summary.retained}
    return out if summary.steps_to_90 is None else {**out, "steps to 90%": summary.steps_to_90}


def verdicts(summaries, retained: str = "retained") -> list:
    """For each pair of methods and each outcome: "differ" or "no difference" (ranges overlap).
    ``retained`` names the source outcome (a text base's: "source loss", where higher is worse)."""
    lines = []
    for i, a in enumerate(summaries):
        for b in summaries[i + 1:]:
            for key, sa in _spreads(a, retained).items():
                sb = _spreads(b, retained).get(key)
                if sb is not None:
                    word = "no difference (min-max ranges overlap)" if sa.overlaps(sb) else \
                        f"{a.method if sa.mean > sb.mean else b.method} higher (ranges apart)"
                    lines.append(f"{key:>13}: {a.method} vs {b.method}: {word}")
    return lines


def format_table(results: CompareResults) -> str:
    """The costs, then the outcomes as mean [min-max] over seeds, then which gaps are real."""
    cfg, seeds = results.config, len(results.config.seeds)
    rows = [["method", "lr", "trainable", "%", "file", "frozen base", "peak step", "ms/step"]]
    for s in results.summaries:  # frozen base: memory.params_frozen, by frozen_nbytes (full: none)
        frozen = _size(s.memory.params_frozen) if s.memory.params_frozen else "0 (all train)"
        rows.append([s.method, f"{s.lr.chosen:g}", f"{s.trainable_params:,}",
                     f"{100 * s.trainable_params / s.all_params:.2f}", _size(s.file_bytes), frozen,
                     _size(s.memory.measured_peak), f"{s.ms_per_step:.1f}"])
    skills = list(results.source_before)
    extra = [k for k, v in results.summaries[0].metrics.items()
             if k != results.target_metric and isinstance(v, Spread)]  # e.g. token accuracy beside entity F1
    outcome = [["method", f"target {results.target_metric}", *extra, "steps to 90%",
                *[f"{k} on" for k in skills], *[f"{k} off" for k in skills]]]
    outcome.append(["base", f"{results.target_before:.3f}", *["" for _ in extra], "",
                    *[f"{v:.3f}" for v in results.source_before.values()], *["" for _ in skills]])
    for s in results.summaries:
        steps = "never" if s.steps_to_90 is None else f"{s.steps_to_90.mean:.0f} [{s.steps_to_90.min:.0f}-{s.steps_to_90.max:.0f}]"
        if s.steps_to_90 is not None and s.reached_90 < seeds:
            steps += f" ({s.reached_90}/{seeds})"
        off = [str(s.source_adapter_off[k]) if s.source_adapter_off else "-" for k in skills]
        outcome.append([s.method, str(s.target), *[str(s.metrics[k]) for k in extra], steps,
                        *[str(s.source[k]) for k in skills], *off])
    source = ("source skills' accuracy" if results.source_metric == "accuracy" else
              f"source: the base's held-out text {results.source_metric} (lower: more kept)")
    per_class = [f"{s.method:>5} {k} per class: "
                 + ", ".join(f"{c} {v:.2f}" for c, v in zip(results.class_names, values))
                 for s in results.summaries for k, values in s.metrics.items() if isinstance(values, list)]
    return "\n".join([_grid(rows), "", f"outcomes, mean [min-max] over seeds {list(cfg.seeds)} "
                      f"({source}, adapter on / off):", _grid(outcome), *([""] + per_class if per_class else []),
                      "", *verdicts(results.summaries, "retained" if results.source_metric == "accuracy"
                                    else f"source {results.source_metric}")])


def _grid(rows) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
