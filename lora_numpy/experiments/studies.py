"""Floor 8: the longer studies behind ``python -m lora_numpy compare --study NAME``.

    rank        LoRA and PiSSA at r in RANKS (alpha = 2r, so the scale alpha/r stays 2 and the
                learning rate chosen at the default rank carries over), full fine-tuning as reference
    lowdata     the main comparison with only LOWDATA_EXAMPLES target training problems
    forgetting  the main comparison on FORGETTING_TARGET, a target that shares no circuit with the
                sources, with each source skill's retention
    variance    how much an outcome moves with the base, with the fine-tuning seed and with the
                thread count: every base fine-tuned with every seed, at each method's chosen rate
    memory      (memory_study.py) peak step memory measured and checked against the formula,
                then projected to real models
    budget      where to spend a fixed number of adapter parameters: q,v at r=16, every Linear at
                r=4, or the MLP only at the rank whose count is closest to q,v's
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from .. import parallel
from ..checkpoint import load_model
from ..io import save_json
from ..memory import ModelShape
from ..models import GPTConfig
from .methods import METHODS
from .protocol import aggregate, paired_verdict
from .report import RETAINED_FLOOR, format_lr_choices, runs_by_method, verdict_rule, verdicts
from .side_by_side import (CompareConfig, CompareResults, MethodSummary, base_dir, compare, fine_tune, grid_runs,
                           pick_lr, run_experiments, source_scores, summarize, tasks)

RANKS = (1, 2, 4, 8, 16, 64)
LOWDATA_EXAMPLES = 300
# Chosen and written down before it was first run (issue 19): |a-b|, the main job's target, *is*
# a - b whenever a >= b, so fine-tuning on it must change the subtraction circuit and every
# method forgets subtraction. Multiplication shares no circuit with addition or subtraction
# that way, so what a method forgets of them is its own doing. Whether "LoRA forgets less"
# shows on it is the finding, either way.
FORGETTING_TARGET = "mul"


def lowdata(cfg: CompareConfig, progress: bool = True) -> CompareResults:
    """The main comparison again, with only a few hundred target examples to learn from."""
    return compare(replace(cfg, max_train=LOWDATA_EXAMPLES, out=str(Path(cfg.out) / "lowdata")), progress)


def forgetting_study(cfg: CompareConfig, progress: bool = True) -> CompareResults:
    """The main comparison on FORGETTING_TARGET (the sources stay the job's)."""
    return compare(replace(cfg, target=FORGETTING_TARGET, out=str(Path(cfg.out) / "forgetting")), progress)


def format_retention(results: CompareResults) -> str:
    """Each source skill's accuracy after fine-tuning over its base's before, mean [min-max] over the
    runs, and the paired verdicts skill by skill."""
    before = results.bases
    skills = list(results.source_before)
    ratio = lambda r, k: r.source_after[k] / max(before[r.base][f"accuracy_{k}"], 1e-9)
    by_method = runs_by_method(results.runs)
    lines = [f"retention: a source skill's accuracy after fine-tuning / its base's before "
             f"(adapter on), mean [min-max] over {len(results.config.seeds)} runs"]
    lines += [f"{m:>8}  " + "   ".join(f"{k} {aggregate(ratio(r, k) for r in runs)}" for k in skills)
              for m, runs in by_method.items()]
    names = list(by_method)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            for k in skills:
                lines.append(str(paired_verdict(f"{k} retained", a, b, [ratio(r, k) for r in by_method[a]],
                                                [ratio(r, k) for r in by_method[b]], RETAINED_FLOOR)))
    return "\n".join(lines)


@dataclass
class RankStudy:
    ranks: tuple
    full: MethodSummary
    by_rank: list                    # (r, MethodSummary) for lora and pissa
    target_before: float             # the bases' target accuracy, mean
    source_before: float             # and their source accuracy, mean over skills and bases
    plot: str = ""


def _bases_before(cfg: CompareConfig) -> tuple:
    """The bases' target metric and source accuracy (mean over skills), each a mean over the bases."""
    source, target = tasks(cfg.source, cfg.target, cfg.max_train)
    bodies = [(load_model(base_dir(cfg, s))[0], s) for s in cfg.seeds]
    return (float(np.mean([target.evaluate(target.make_model(b, s))[target.metric] for b, s in bodies])),
            float(np.mean([np.mean(list(source_scores(source, b).values())) for b, _ in bodies])))


def rank_study(cfg: CompareConfig, progress: bool = True, ranks=RANKS) -> RankStudy:
    """Capacity: target gained and source kept as the rank grows, over the same (base, seed)
    pairs. Each method's rate is chosen at the default rank and kept. Ranks above the model's
    width are skipped (a rank-r update needs r <= both sides of a matrix)."""
    from ..plots import save_rank_study

    ranks = tuple(r for r in ranks if r <= cfg.size.n_embd)
    out = Path(cfg.out) / "rank"
    methods = ("full", "lora", "pissa")
    grid = run_experiments(cfg, {"grid": (grid_runs(cfg, methods), cfg.lora, None)}, progress)["grid"]
    choices = {m: pick_lr(cfg, METHODS[m], grid) for m in methods}
    print(format_lr_choices(choices, "accuracy", cfg.train.steps, cfg.seeds))
    loras = {r: replace(cfg.lora, r=r, lora_alpha=2 * r) for r in ranks}
    groups = {r: ([(m, choices[m].chosen, s) for m in ("lora", "pissa") for s in cfg.seeds], lora, None)
              for r, lora in loras.items() if lora != cfg.lora}
    by_rank = {**run_experiments(cfg, groups, progress), **{r: grid for r, lora in loras.items() if lora == cfg.lora}}
    summaries = {("full", None): summarize(METHODS["full"], choices["full"],
                                           [grid["full", choices["full"].chosen, s] for s in cfg.seeds], cfg, out)}
    full = summaries["full", None]
    print(f" full, every weight: target {full.target}, source retained {full.retained}")
    for m in ("lora", "pissa"):
        for r in ranks:
            runs = [by_rank[r][m, choices[m].chosen, s] for s in cfg.seeds]
            summaries[m, r] = summarize(METHODS[m], choices[m], runs, cfg, out / f"r{r}", loras[r])
            print(f"{m:>5} r={r}: target {summaries[m, r].target}, source retained {summaries[m, r].retained}")
    study = RankStudy(ranks, summaries["full", None],
                      [(r, s) for (n, r), s in summaries.items() if n != "full"], *_bases_before(cfg))
    study.plot = str(save_rank_study(study, out))
    save_json(out / "results.json", {"ranks": list(ranks), "full": asdict(study.full),
                                     "target_before": study.target_before, "source_before": study.source_before,
                                     "by_rank": [{"r": r, **asdict(s)} for r, s in study.by_rank]})
    return study


@dataclass
class VarianceStudy:
    """Where an outcome's spread comes from, per method: the range (max - min) of the target
    metric and of the source retained, over bases with the seed fixed, over seeds with the base
    fixed (each a mean over the other factor), and between one thread and two."""
    methods: tuple
    lrs: dict                        # method -> the chosen rate
    target: dict                     # method -> {(base, seed): target metric at the end}
    retained: dict                   # method -> {(base, seed): source retained}
    threads: dict                    # method -> max |difference| of (target, retained), 1 vs 2 threads
    seeds: tuple

    def ranges(self, values: dict) -> tuple:
        """(from the base, from the seed): mean over seeds of the range over bases, and back."""
        v = np.array([[values[b, s] for s in self.seeds] for b in self.seeds])  # v[base, seed]
        return float(np.ptp(v, axis=0).mean()), float(np.ptp(v, axis=1).mean())


def variance_study(cfg: CompareConfig, progress: bool = True, main: CompareResults | None = None) -> VarianceStudy:
    """Every base fine-tuned with every seed at each method's rate, chosen over the bases as in
    the main job (``main``: a finished main job on ``cfg``, whose rates and runs are reused), and
    the runs of base 0, seed 0 again in this process with two threads."""
    if main is None:
        grid = run_experiments(cfg, {"grid": (grid_runs(cfg, cfg.methods), cfg.lora, None)}, progress)["grid"]
        lrs = {m: pick_lr(cfg, METHODS[m], grid).chosen for m in cfg.methods}
    else:
        lrs = {s.method: s.lr.chosen for s in main.summaries}
        grid = {(r.method, r.lr, r.seed): r for r in main.runs}
    groups = {b: ([(m, lrs[m], s) for m in cfg.methods for s in cfg.seeds if s != b], cfg.lora, b)
              for b in cfg.seeds}
    cross = run_experiments(cfg, groups, progress)
    run = lambda m, b, s: grid[m, lrs[m], s] if b == s else cross[b][m, lrs[m], s]
    retained = lambda r: float(np.mean(list(r.source_after.values())))
    pairs = [(b, s) for b in cfg.seeds for s in cfg.seeds]
    threads, before = {}, parallel.threads
    try:
        parallel.set_threads(2)
        for m in cfg.methods:
            again, first = fine_tune(cfg, m, lrs[m], cfg.seeds[0], cfg.lora), grid[m, lrs[m], cfg.seeds[0]]
            threads[m] = (abs(again.target_after - first.target_after), abs(retained(again) - retained(first)))
    finally:
        parallel.set_threads(before)
    study = VarianceStudy(tuple(cfg.methods), lrs, {m: {p: run(m, *p).target_after for p in pairs} for m in cfg.methods},
                          {m: {p: retained(run(m, *p)) for p in pairs} for m in cfg.methods}, threads, tuple(cfg.seeds))
    save_json(Path(cfg.out) / "variance" / "results.json", {
        "seeds": list(study.seeds), "lrs": lrs, "threads": threads,
        "runs": [{"method": m, "base": b, "seed": s, "target": study.target[m][b, s], "retained": study.retained[m][b, s]}
                 for m in study.methods for b, s in pairs]})
    return study


def format_variance(study: VarianceStudy, metric: str = "accuracy") -> str:
    rows = [f"where the spread comes from: range (max - min) over {len(study.seeds)} bases with the seed fixed, "
            f"over {len(study.seeds)} fine-tuning seeds with the base fixed (each a mean over the other), "
            "and between one thread and two (base 0, seed 0)",
            f"{'method':>8} {'lr':>7} | {'target ' + metric:^38} | {'source retained':^38}",
            f"{'':>8} {'':>7} | {'base':>12} {'seed':>12} {'threads':>12} | {'base':>12} {'seed':>12} {'threads':>12}"]
    for m in study.methods:
        tb, ts = study.ranges(study.target[m])
        rb, rs = study.ranges(study.retained[m])
        tt, rt = study.threads[m]
        rows.append(f"{m:>8} {study.lrs[m]:>7g} | {tb:>12.3f} {ts:>12.3f} {tt:>12.3f} | {rb:>12.3f} {rs:>12.3f} {rt:>12.3f}")
    return "\n".join(rows)


@dataclass(frozen=True)
class TargetSet:
    """Where the adapters go, and at which rank (None: matched to the first set's budget)."""
    label: str
    target_modules: object           # PEFT's target_modules: "all-linear" or a tuple of names
    r: int | None


# The first set fixes the budget; a set without a rank gets the one closest to that budget.
BUDGET_SETS = (TargetSet("q,v r=16", ("q_proj", "v_proj"), 16),
               TargetSet("all-linear r=4", "all-linear", 4),
               TargetSet("MLP", ("fc1", "fc2"), None))


def matched_rank(shape: ModelShape, target_modules, budget: int) -> int:
    """The rank r >= 1 whose adapters on ``target_modules`` hold the number of parameters closest
    to ``budget``. A LoRA pair costs r(d_in + d_out), linear in r, so only the two ranks around
    budget / count(r=1) can be closest; a tie goes to the smaller."""
    per_rank = shape.lora_parameters(1, target_modules)
    low = max(1, budget // per_rank)
    return min((low, low + 1), key=lambda r: (abs(r * per_rank - budget), r))


@dataclass
class BudgetRow:
    label: str
    target_modules: object
    r: int
    lora_alpha: float
    adapter_params: int              # r(d_in + d_out) over the adapted Linears, from the shapes
    summary: MethodSummary           # its lr choice and outcomes over the seeds (method = label)


@dataclass
class BudgetStudy:
    budget: int                      # the first set's adapter parameters
    rows: list                       # BudgetRow per target set
    target_before: float
    source_before: float
    seeds: tuple
    runs: list = field(repr=False)   # RunResult per set and seed at its rate (method = the set's label)
    noise_floor: float = 0.01        # the target metric's (Task.noise_floor)
    eval_every: int = 50
    steps: int = 400


def budget_study(cfg: CompareConfig, progress: bool = True, sets=BUDGET_SETS) -> BudgetStudy:
    """Target sets at (nearly) one parameter budget, each LoRA (alpha = 2r) at its own learning
    rate chosen on validation over the bases, on the same (base, seed) pairs."""
    out = Path(cfg.out) / "budget"
    too_wide = [s.label for s in sets if s.r is not None and s.r > cfg.size.n_embd]
    if too_wide:
        raise ValueError(f"{too_wide} need a rank above the model width {cfg.size.n_embd}: "
                         f"use --n-embd >= {max(s.r for s in sets if s.r)}")
    source, _ = tasks(cfg.source, cfg.target, cfg.max_train)
    shape = ModelShape.from_gpt_config(GPTConfig(vocab_size=source.vocab_size, block_size=source.block_size,
                                                 n_layer=cfg.size.n_layer, n_head=cfg.size.n_head,
                                                 n_embd=cfg.size.n_embd))
    budget = shape.lora_parameters(sets[0].r, sets[0].target_modules)
    method = METHODS["lora"]
    loras = {}
    for s in sets:
        r = s.r or matched_rank(shape, s.target_modules, budget)
        loras[s.label] = replace(cfg.lora, r=r, lora_alpha=2 * r, target_modules=s.target_modules)
    results = run_experiments(cfg, {label: (grid_runs(cfg, ["lora"]), lora, None) for label, lora in loras.items()},
                              progress)
    rows, runs = [], []
    for s in sets:
        lora, choice = loras[s.label], pick_lr(cfg, method, results[s.label])
        set_runs = [replace(results[s.label]["lora", choice.chosen, seed], method=s.label) for seed in cfg.seeds]
        runs += set_runs
        folder = out / s.label.replace(" ", "_").replace(",", "").replace("=", "")
        summary = replace(summarize(method, choice, set_runs, cfg, folder, lora), method=s.label)
        rows.append(BudgetRow(s.label, s.target_modules, lora.r, lora.lora_alpha,
                              shape.lora_parameters(lora.r, s.target_modules), summary))
    target_before, source_before = _bases_before(cfg)
    study = BudgetStudy(budget, rows, target_before, source_before, tuple(cfg.seeds), runs,
                        tasks(cfg.source, cfg.target, cfg.max_train)[1].noise_floor, cfg.train.eval_every,
                        cfg.train.steps)
    save_json(out / "results.json", {"budget": budget, "target_before": target_before,
                                     "source_before": source_before, "seeds": list(cfg.seeds),
                                     "rows": [asdict(row) for row in rows]})
    return study


def format_budget(study: BudgetStudy) -> str:
    """Each set's learning-rate scores, one line per target set (outcomes as mean [min-max] over
    the runs), then the paired verdicts."""
    n = len(study.seeds)

    def steps(s: MethodSummary) -> str:
        if s.steps_to_90 is None:
            return "never"
        x = s.steps_to_90
        return f"{x.mean:.0f} [{x.min:.0f}-{x.max:.0f}]" + (f" ({s.reached_90}/{n})" if s.reached_90 < n else "")

    lines = [format_lr_choices({row.label: row.summary.lr for row in study.rows}, "accuracy", study.steps,
                               study.seeds), "",
             f"adapter parameters matched to {study.rows[0].label}: {study.budget:,}; "
             f"base: target {study.target_before:.3f}, source {study.source_before:.3f}",
             f"outcomes, mean [min-max] over {n} runs, run k: base k fine-tuned with seed k, seeds "
             f"{list(study.seeds)} (retained: source skills, adapter on)",
             f"{'set':<15} {'modules':<18} {'r':>2} {'alpha':>5} {'adapter':>8} {'vs budget':>9} {'lr':>6} "
             f"{'target accuracy':>20} {'steps to 90%':>17} {'retained':>20}"]
    for row in study.rows:
        s = row.summary
        modules = row.target_modules if isinstance(row.target_modules, str) else ",".join(row.target_modules)
        lines.append(f"{row.label:<15} {modules:<18} {row.r:>2} {row.lora_alpha:>5g} {row.adapter_params:>8,} "
                     f"{row.adapter_params / study.budget - 1:>+9.1%} {s.lr.chosen:>6g} {str(s.target):>20} "
                     f"{steps(s):>17} {str(s.retained):>20}")
    return "\n".join([*lines, "", verdict_rule(study.noise_floor, study.eval_every, n),
                      *map(str, verdicts(study.runs, study.noise_floor, study.eval_every, study.steps))])
