"""Floor 8: the main job. Full fine-tuning, LoRA and PiSSA, side by side, made fair and robust.

Run k pretrains a base model on a mixture of source skills with seed k (or reuses it from a
cache) and fine-tunes copies of it on a new target skill with seed k, so every spread covers the
base's randomness as well as the fine-tuning's. Every method gets the same data, steps and
schedule; only its learning rate is its own: every value of its grid is run in full on every
base and scored on the validation split, and the best mean wins (protocol.py). The outcomes are
those of the chosen rate's runs, on the test split: the target metric at the end and the best it
reached, the steps to reach 90% on it, and how much of each source skill survives, with the
adapter on and (LoRA, PiSSA) switched off. Methods share bases and seeds, so they are compared
pair by pair (report.py prints the tables and verdicts).

The text targets (``ner``, ``translate``, ``docs``) go through the same protocol from bases
pretrained on the standard library's documentation (an encoder by masked LM for ``ner``, a
decoder otherwise); what a base keeps is its held-out text loss, adapter on and off.
``config_for(target)`` gives each target's default schedule.
"""
from __future__ import annotations

import json
import math
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
from ..recipes import ARITHMETIC_OPS, TEXT_TARGETS, ModelSize, default_source
from ..tasks import TASK_TYPES, Task
from ..train import TrainConfig, TrainingDiverged, default_loss, save_history_csv, train
from .bases import base_dir, base_jobs, task
from .methods import DEFAULT_METHODS, METHODS, Method, count_parameters
from .protocol import LrChoice, Spread, aggregate, choose_lr, steps_to_reach
from .runner import Job, run_all, workers


def _default_lora() -> LoraConfig:
    return LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")  # every Linear but the head


def _default_train() -> TrainConfig:  # lr is chosen per method; everything else is shared
    # 600 steps: full fine-tuning's target accuracy is on its plateau by then (measured: within
    # 0.01 over the last 100 steps on every base), so "at end" is what the method can do.
    return TrainConfig(steps=600, batch_size=64, warmup_steps=60, weight_decay=0.0, eval_every=50)


@dataclass
class CompareConfig:
    source: str | None = None      # what the bases are pretrained on (None: default_source(target),
                                   # the skills "add,sub", or "mlm" / "causal" for a text target)
    target: str = "absdiff"        # the new skill every method learns ("sum": classification)
    methods: tuple = DEFAULT_METHODS  # any of METHODS
    lora: LoraConfig = field(default_factory=_default_lora)
    train: TrainConfig = field(default_factory=_default_train)
    seeds: tuple = (0, 1, 2)       # run k: a base pretrained with seed k, fine-tuned with seed k
    lr: dict = field(default_factory=dict)  # method -> a fixed learning rate, skipping its grid
    lr_grid: dict | None = None    # method -> the rates it tries (a method not named: its own grid)
    max_train: int | None = None   # target training examples (None: all; the low-data study: few)
    base_steps: int = 3000          # the mixture needs ~2500 steps for "-" (measured: 94% at 2000)
    size: ModelSize = field(default_factory=ModelSize)
    eval_limit: int | None = None  # test examples per evaluation during training (None: all; a
                                   # limit, or one evaluation per run, leaves "best" and "rise" unmeasured)
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
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"need at least one seed, each once, got {self.seeds}")
        if self.lr_grid is not None and not isinstance(self.lr_grid, dict):
            raise ValueError(f"lr_grid maps a method to its rates, e.g. {{'lora': (1e-3, 3e-3)}}; got {self.lr_grid!r}")
        bad = [m for m, grid in (self.lr_grid or {}).items() if not (grid and all(lr > 0 for lr in grid))]
        if bad:
            raise ValueError(f"lr_grid of {bad} must hold positive learning rates, got {self.lr_grid}")

    def grid(self, method: Method) -> tuple:
        """The learning rates ``method`` is run at: the user's fixed one, or the grid."""
        if method.name in self.lr:
            return (self.lr[method.name],)
        return tuple(sorted((self.lr_grid or {}).get(method.name, method.lr_grid)))


# The text targets' defaults, sized so that one default run (bases included) takes at most five
# minutes on two cores: short runs, one evaluation at the end, the three core methods, three
# rates each. Each grid was moved until the choice sat inside it (the output flags a choice on an
# edge): full fine-tuning chose 1e-2 on ner, 3e-3 on translate and 1e-3 on docs, and the adapters
# 1e-2, 1e-2 and 3e-3, LoRA's rate a step above full fine-tuning's but on ner (measured).
AROUND = {1e-3: (3e-4, 1e-3, 3e-3), 3e-3: (1e-3, 3e-3, 1e-2), 1e-2: (3e-3, 1e-2, 3e-2)}
TEXT_DEFAULTS = {
    "ner": dict(steps=250, batch_size=32, base_steps=600,
                lr_grid={"full": AROUND[1e-2], "lora": AROUND[1e-2], "pissa": AROUND[1e-2]}),
    "translate": dict(steps=150, batch_size=32, base_steps=600,
                      lr_grid={"full": AROUND[3e-3], "lora": AROUND[1e-2], "pissa": AROUND[1e-2]}),
    "docs": dict(steps=200, batch_size=32, base_steps=600,
                 lr_grid={"full": AROUND[1e-3], "lora": AROUND[3e-3], "pissa": AROUND[3e-3]}),
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
    defaults = dict(target=target, train=train, base_steps=d["base_steps"], lr_grid=d["lr_grid"],
                    methods=("full", "lora", "pissa"), lora=replace(_default_lora(), target_modules=ADAPTED_MODULES))
    return CompareConfig(**{**defaults, **changes})


# --- one fine-tuning run --------------------------------------------------------------------

def tasks(source: str, target: str, max_train: int | None) -> tuple:
    """(source task, target task), built once per process."""
    return task(source), task(target, max_train)


def prepare(method: Method, base, target: Task, lora: LoraConfig, seed: int):
    """A fresh copy of the base (its folder), made into the target's model (a new head for a
    classifier, trained by every method: PEFT's modules_to_save of its task type), ready for ``method``."""
    model = target.make_model(load_model(base)[0], seed)
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


def unknown_scores(source: Task) -> dict:
    """source_scores' keys, each NaN: what a run whose loss became NaN knows is not measured."""
    return {k: float("nan") for k in (source.skills if len(source.skills) > 1 else [source.name])}


@dataclass
class RunResult:
    """One method at one learning rate on one (base, seed) pair."""
    method: str
    seed: int                        # the fine-tuning seed (batches, adapter init)
    base: int                        # the base's pretraining seed (the seed itself, but in the variance study)
    lr: float
    val_score: float                 # the target metric on the validation split at the end
    diverged: bool                   # the loss became NaN (the run stopped there)
    target_after: float              # test split, at the end
    target_best: float               # the best evaluation during training (test split; NaN: no curve)
    target_rise: float               # the rise over the last fifth of the steps: near 0 on a plateau
    steps_to_90: int | None          # None: never reached within the run
    source_after: dict               # skill -> accuracy, adapter on
    source_adapter_off: dict | None  # skill -> accuracy with disable_adapter() (None: full)
    ms_per_step: float
    history: list = field(repr=False)
    metrics: dict = field(default_factory=dict)  # every metric of the final test evaluation


def train_config(cfg: CompareConfig, lr: float, seed: int) -> TrainConfig:
    return replace(cfg.train, lr=lr, seed=seed)


def fine_tune(cfg: CompareConfig, method_name: str, lr: float, seed: int, lora: LoraConfig,
              base: int | None = None) -> RunResult:
    """Fine-tune a fresh copy of base ``base`` (default: ``seed``) with a method at ``lr`` and
    ``seed``, and measure it (a job). A run whose loss becomes NaN stops there and scores 0."""
    method, base = METHODS[method_name], seed if base is None else base
    source, target = tasks(cfg.source, cfg.target, cfg.max_train)
    model = prepare(method, base_dir(cfg, base), target, lora, seed)
    metric, evaluations = f"target_{target.metric}", []

    def curve(m):  # the test metric along the way (its last evaluation is the final one, unless limited)
        evaluations.append(target.evaluate(m, cfg.eval_limit))
        return {metric: evaluations[-1][target.metric]}
    config = train_config(cfg, lr, seed)
    # step 0 starts a curve; a run evaluated only at its end (the text targets) has none to start
    start = [{"step": 0, **curve(model)}] if 0 < config.eval_every < config.steps else []
    try:
        history = train(model, target.batch_fn(cfg.train.batch_size), config, loss_fn=target.loss_fn,
                        optimizer=method.optimizer(model, config), eval_fn=curve, progress=False)
    except TrainingDiverged:
        return RunResult(method_name, seed, base, lr, val_score=0.0, diverged=True, target_after=0.0,
                         target_best=0.0, target_rise=0.0, steps_to_90=None, source_after=unknown_scores(source),
                         source_adapter_off=unknown_scores(source) if method.has_adapter else None,
                         ms_per_step=0.0, history=start)
    off = None
    if method.has_adapter:
        with model.disable_adapter():
            off = source_scores(source, model)
    final = evaluations[-1] if cfg.eval_limit is None else target.evaluate(model)
    # best and rise read the curve, so they need two points of it on the final's examples
    points = [(h["step"], h[metric]) for h in history if metric in h]
    points = points if cfg.eval_limit is None and len(points) > 1 else []
    earlier = min(points, key=lambda p: abs(p[0] - 0.8 * config.steps))[1] if points else math.nan  # 80% in
    return RunResult(method_name, seed, base, lr, target.evaluate(model, split="val")[target.metric], False,
                     final[target.metric], max((v for _, v in points), default=math.nan),
                     final[target.metric] - earlier,
                     steps_to_reach(history, metric, target.reach), source_scores(source, model), off,
                     float(np.median([h["ms"] for h in history])), [*start, *history], final)


def run_jobs(cfg: CompareConfig, runs: list, lora: LoraConfig | None = None, base: int | None = None,
             tag=None) -> dict:
    """The jobs of ``runs`` ((method, lr, seed) each) on ``lora`` (and ``base``, default each
    seed's own), keyed (tag, method, lr, seed); each starts once its base is pretrained (or at
    once, if the base is cached)."""
    lora, pending = lora or cfg.lora, base_jobs(cfg)
    after = lambda s: ("base", s) if ("base", s) in pending else None
    return {(tag, m, lr, s): Job(f"{m:>8} lr {lr:<6g} seed {s}" + ("" if base is None else f" base {base}"),
                                 fine_tune, (cfg, m, lr, s, lora, base), after=after(s if base is None else base),
                                 describe=lambda r: (f"validation {r.val_score:.3f}, test {r.target_after:.3f}"
                                                     + (" (diverged)" if r.diverged else "")))
            for m, lr, s in runs}


def grid_runs(cfg: CompareConfig, methods) -> list:
    """Every (method, lr, seed) of the learning-rate choice of ``methods``."""
    return [(m, lr, s) for m in methods for lr in cfg.grid(METHODS[m]) for s in cfg.seeds]


def pick_lr(cfg: CompareConfig, method: Method, results: dict) -> LrChoice:
    """The method's rate from its grid runs in ``results`` ((method, lr, seed) -> RunResult)."""
    if method.name in cfg.lr:  # fixed by the user: no grid
        return LrChoice((cfg.lr[method.name],), (), cfg.lr[method.name])
    return choose_lr(cfg.grid(method), lambda lr: [results[method.name, lr, s].val_score for s in cfg.seeds])


def run_experiments(cfg: CompareConfig, groups: dict, progress: bool = True) -> dict:
    """Pretrain the missing bases and run every group on them, on every core. ``groups``: tag ->
    (runs, lora, base) as ``run_jobs`` takes them; returns tag -> {(method, lr, seed): RunResult}."""
    jobs = base_jobs(cfg)
    for tag, (runs, lora, base) in groups.items():
        jobs.update(run_jobs(cfg, runs, lora, base, tag))
    out = {tag: {} for tag in groups}
    for key, result in run_all(jobs, progress).items():
        if len(key) == 4:  # a run's (tag, method, lr, seed), not a base's ("base", seed)
            out[key[0]][key[1:]] = result
    return out


def run_experiment(cfg: CompareConfig, runs: list, progress: bool = True, lora: LoraConfig | None = None) -> dict:
    """``run_experiments`` of one group: (method, lr, seed) -> RunResult."""
    return run_experiments(cfg, {None: (runs, lora, None)}, progress)[None]


# --- the comparison -------------------------------------------------------------------------

@dataclass
class MethodSummary:
    """One method over all (base, seed) pairs: its learning-rate choice, its costs, its outcomes."""
    method: str
    lr: LrChoice
    trainable_params: int
    all_params: int
    file_bytes: int
    memory: StepMemory
    ms_per_step: float
    target: Spread                   # at the end
    target_best: Spread              # the best evaluation during each run
    target_rise: Spread              # the rise over each run's last fifth of steps (plateau: ~0)
    steps_to_90: Spread | None       # over the runs that reached 90%
    reached_90: int                  # how many runs did
    source: dict                     # skill -> Spread, adapter on
    source_adapter_off: dict | None  # skill -> Spread, adapter off
    retained: Spread                 # per run, the mean over skills (adapter on)
    metrics: dict = field(default_factory=dict)  # every final metric: name -> Spread (per class: mean list)


def summarize(method: Method, choice: LrChoice, runs: list, cfg: CompareConfig, out: Path,
              lora: LoraConfig | None = None) -> MethodSummary:
    """Aggregate the runs, and measure what one copy costs: parameters, file, step memory."""
    _, target = tasks(cfg.source, cfg.target, cfg.max_train)
    model = prepare(method, base_dir(cfg, cfg.seeds[0]), target, lora or cfg.lora, cfg.seeds[0])
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
        aggregate(r.target_after for r in runs), aggregate(r.target_best for r in runs),
        aggregate(r.target_rise for r in runs), aggregate(reached) if reached else None, len(reached),
        per_skill("source_after"), per_skill("source_adapter_off") if method.has_adapter else None,
        aggregate(np.mean(list(r.source_after.values())) for r in runs), final_metrics(runs))


def final_metrics(runs) -> dict:
    """Each final metric over the runs: a Spread, or for a per-class list the mean per class."""
    return {k: aggregate(r.metrics[k] for r in runs) if np.isscalar(v) else
            np.mean([r.metrics[k] for r in runs], axis=0).tolist() for k, v in runs[0].metrics.items()}


@dataclass
class CompareResults:
    config: CompareConfig
    bases: dict                      # seed -> the base's report (per-skill accuracy), its folder
    target_metric: str
    target_before: Spread            # the bases' target metric before fine-tuning
    source_before: dict              # skill -> the bases' accuracy (a text base: its val_loss)
    summaries: list                  # MethodSummary per method
    runs: list = field(repr=False)   # RunResult per method and seed, at the chosen rate
    seconds: float = 0.0
    plots: list = field(default_factory=list)
    source_metric: str = "accuracy"  # "val_loss" for a text base (lower is better)
    class_names: tuple = ()          # the order of per-class metrics (docs)
    noise_floor: float = 0.01        # the target metric's: paired differences below it are noise

    def to_json(self) -> dict:
        """Everything but the per-step histories (those go to history.csv)."""
        data = asdict(self)
        for run in data["runs"]:
            run.pop("history")
        return json.loads(json.dumps(data, default=str))  # the few non-JSON values (paths) as text


def compare(cfg: CompareConfig, progress: bool = True) -> CompareResults:
    """Choose each method's lr over the bases, and write results.json, history.csv and the plots
    of the chosen runs into cfg.out."""
    from ..plots import plot_comparison  # matplotlib is only needed here

    start = time.perf_counter()
    out = Path(cfg.out)
    source, target = tasks(cfg.source, cfg.target, cfg.max_train)
    print(f"{len(base_jobs(cfg))} of {len(cfg.seeds)} bases to pretrain on '{cfg.source}' (the rest are cached "
          f"in {cfg.cache}); {len(grid_runs(cfg, cfg.methods))} fine-tuning runs of {cfg.train.steps} steps, "
          f"{workers()} at a time")
    results = run_experiment(cfg, grid_runs(cfg, cfg.methods), progress)
    bases = {s: {"folder": str(base_dir(cfg, s)), **load_json(base_dir(cfg, s) / "config.json")["report"]}
             for s in cfg.seeds}
    bodies = [load_model(base_dir(cfg, s))[0] for s in cfg.seeds]
    before = [source_scores(source, body) for body in bodies]
    target_before = [target.evaluate(target.make_model(body, s))[target.metric] for body, s in zip(bodies, cfg.seeds)]
    summaries, runs = [], []
    for name in cfg.methods:
        method = METHODS[name]
        choice = pick_lr(cfg, method, results)
        method_runs = [results[name, choice.chosen, s] for s in cfg.seeds]
        runs += method_runs
        summaries.append(summarize(method, choice, method_runs, cfg, out))
    outcome = CompareResults(cfg, bases, target.metric, aggregate(target_before),
                             {k: aggregate(b[k] for b in before) for k in before[0]}, summaries, runs,
                             source_metric=source.metric, class_names=tuple(target.class_names),
                             noise_floor=target.noise_floor)
    outcome.seconds = time.perf_counter() - start
    outcome.plots = [str(p) for p in plot_comparison(outcome, out)]
    save_json(out / "results.json", outcome.to_json())
    save_history_csv([{"method": r.method, "seed": r.seed, **h} for r in runs for h in r.history],
                     out / "history.csv")
    return outcome
