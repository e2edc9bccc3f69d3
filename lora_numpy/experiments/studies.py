"""Floor 8: the longer studies behind ``python -m lora_numpy compare --study NAME``.

    rank     LoRA and PiSSA at r in RANKS (alpha = 2r, so the scale alpha/r stays 2 and the
             learning rate chosen at the default rank carries over), full fine-tuning as reference
    lowdata  the main comparison with only LOWDATA_EXAMPLES target training problems
    memory   peak step memory measured at the benchmark sizes, checked against the formula,
             then projected with it to GPT-2 124M, LLaMA-2 7B / 70B and LLaMA 65B (with QLoRA
             rows), and the QLoRA paper's headline (65B fine-tuning in 48 GB) term by term
    budget   where to spend a fixed number of adapter parameters: q,v at r=16, every Linear at
             r=4, or the MLP only at the rank whose count is closest to q,v's
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from ..checkpoint import load_model
from ..io import save_json
from ..memory import (FULL, FLOAT32, GPU_BYTES, LORA, PROJECTED_RUNS, PROJECTED_SHAPES, PROJECTION_BATCH,
                      PROJECTION_SEQ, MemoryBreakdown, ModelShape, QLoRAFit, measure_step, qlora_fit,
                      step_memory_formula)
from ..models import GPT, GPTConfig
from ..optim import AdamW
from ..peft import LoraConfig, get_peft_model
from ..recipes import BENCHMARK_SIZES, make_task
from ..train import default_loss
from .side_by_side import (CompareConfig, MethodSummary, base_model, compare, pick_lr, run_method,
                           source_scores, summarize, verdicts)
from .methods import METHODS

RANKS = (1, 2, 4, 8, 16, 64)
LOWDATA_EXAMPLES = 300


def lowdata(cfg: CompareConfig, progress: bool = True):
    """The main comparison again, with only a few hundred target examples to learn from."""
    return compare(replace(cfg, max_train=LOWDATA_EXAMPLES, out=str(Path(cfg.out) / "lowdata")), progress)


@dataclass
class RankStudy:
    ranks: tuple
    full: MethodSummary
    by_rank: list                    # (r, MethodSummary) for lora and pissa
    target_before: float             # the base model's target accuracy
    source_before: float             # and its source accuracy, mean over skills
    plot: str = ""


def rank_study(cfg: CompareConfig, progress: bool = True, ranks=RANKS) -> RankStudy:
    """Capacity: target gained and source kept as the rank grows, over the same seeds. Ranks
    above the model's width are skipped (a rank-r update needs r <= both sides of a matrix)."""
    from ..plots import save_rank_study

    ranks = tuple(r for r in ranks if r <= cfg.size.n_embd)
    out = Path(cfg.out) / "rank"
    source, target = make_task(cfg.source), make_task(cfg.target, max_train=cfg.max_train)
    base_dir = base_model(cfg, progress)
    base = load_model(base_dir)[0]
    target_before = target.evaluate(base)[target.metric]
    source_before = float(np.mean(list(source_scores(source, base).values())))
    summaries = {}
    for name in ("full", "lora", "pissa"):
        method = METHODS[name]
        choice = pick_lr(method, base_dir, target, cfg)  # at the default rank
        print(f"{name:>5} lr on validation (* chosen): {choice}")
        for r in (ranks if method.has_adapter else (None,)):
            lora = cfg.lora if r is None else replace(cfg.lora, r=r, lora_alpha=2 * r)
            runs = [run_method(method, choice.chosen, seed, base_dir, source, target, cfg, lora, progress)
                    for seed in cfg.seeds]
            summaries[name, r] = summarize(method, choice, runs, base_dir, target, cfg, out / f"r{r}", lora)
            s = summaries[name, r]
            print(f"{name:>5} r={r}: target {s.target}, source retained {s.retained}")
    study = RankStudy(ranks, summaries["full", None],
                      [(r, s) for (n, r), s in summaries.items() if n != "full"], target_before, source_before)
    study.plot = str(save_rank_study(study, out))
    save_json(out / "results.json", {"ranks": list(ranks), "full": asdict(study.full),
                                     "target_before": target_before, "source_before": source_before,
                                     "by_rank": [{"r": r, **asdict(s)} for r, s in study.by_rank]})
    return study


@dataclass
class MeasuredMemory:
    size: str
    method: str
    params: int
    measured_peak: int
    formula: MemoryBreakdown

    @property
    def error(self) -> float:
        """(formula - measured) / measured."""
        return self.formula.total / self.measured_peak - 1


@dataclass
class ProjectedMemory:
    shape: str
    method: str
    precision: str
    params: int
    trainable: int
    memory: MemoryBreakdown


@dataclass
class MemoryStudy:
    measured: list
    projected: list
    headline: QLoRAFit
    batch: int = PROJECTION_BATCH
    seq: int = PROJECTION_SEQ
    split_shape: str = "LLaMA-2 7B"
    plot: str = ""


def measure_benchmark_size(name: str, kind) -> MeasuredMemory:
    """One training step of the benchmark size ``name``, full or LoRA (all-linear, r=8), measured."""
    size = BENCHMARK_SIZES[name]
    config = GPTConfig(vocab_size=size.vocab, block_size=size.context, n_layer=size.model.n_layer,
                       n_head=size.model.n_head, n_embd=size.model.n_embd)
    model = GPT(config, seed=0)
    if kind.lora_rank is not None:
        model = get_peft_model(model, LoraConfig(r=kind.lora_rank, lora_alpha=2 * kind.lora_rank,
                                                 target_modules=kind.lora_targets))
    optimizer = AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-9)
    rng = np.random.default_rng(0)
    batch = tuple(rng.integers(0, size.vocab, (size.batch, size.context)) for _ in range(2))
    measure_step(model, batch, default_loss, optimizer)  # warm-up: creates the optimizer state
    peak = measure_step(model, batch, default_loss, optimizer).measured_peak
    formula = step_memory_formula(ModelShape.from_gpt_config(config, name), kind, FLOAT32, size.batch, size.context)
    return MeasuredMemory(name, kind.name, model.num_parameters(), peak, formula)


def project(shapes=PROJECTED_SHAPES, runs=PROJECTED_RUNS, batch: int = PROJECTION_BATCH,
            seq: int = PROJECTION_SEQ) -> list:
    rows = []
    for shape in shapes:
        for kind, precision in runs:
            trainable = (shape.num_parameters() if kind.lora_rank is None
                         else shape.lora_parameters(kind.lora_rank, kind.lora_targets))
            rows.append(ProjectedMemory(shape.name, kind.name, precision.name, shape.num_parameters(),
                                        trainable, step_memory_formula(shape, kind, precision, batch, seq)))
    return rows


def memory_study(out, progress: bool = True, sizes=tuple(BENCHMARK_SIZES)) -> MemoryStudy:
    from ..plots import save_memory_study

    measured = []
    for name in sizes:
        for kind in (FULL, LORA):
            measured.append(measure_benchmark_size(name, kind))
            if progress:
                m = measured[-1]
                print(f"measured {name:>6} {kind.name:>4}: peak {m.measured_peak / 2**20:8.2f} MiB, "
                      f"formula {m.formula.total / 2**20:8.2f} MiB ({m.error:+.1%})")
    study = MemoryStudy(measured, project(), qlora_fit())
    study.plot = str(save_memory_study(study, out))
    save_json(Path(out) / "memory.json", {
        "measured": [{**asdict(m), "error": m.error} for m in measured],
        "projected": [asdict(p) for p in study.projected],
        "qlora_headline": {**asdict(study.headline), "fits_48GB": study.headline.fits},
        "projection_tokens": {"batch": study.batch, "seq": study.seq}})
    return study


def format_memory(study: MemoryStudy) -> str:
    gib = lambda b: f"{b / 2**30:9.2f}"
    lines = [f"projected peak of one training step, batch {study.batch} x {study.seq} tokens, GiB "
             "(LoRA, QLoRA: r=8 on every Linear of the blocks; QLoRA: those Linears' weights in 4-bit NF4 "
             "with double quantization; optimizer: AdamW m and v, plus the float32 "
             "master weights in mixed precision; activ.: activations and backward buffers)",
             f"{'model':<12} {'params':>14} {'precision':<10} {'method':<6} {'trainable':>14} "
             f"{'weights':>9} {'grads':>9} {'optimizer':>9} {'activ.':>9} {'total':>9}"]
    for p in study.projected:
        m = p.memory
        lines.append(f"{p.shape:<12} {p.params:>14,} {p.precision.split(' ')[0]:<10} {p.method:<6} "
                     f"{p.trainable:>14,} {gib(m.weights)} {gib(m.gradients)} {gib(m.optimizer_state)} "
                     f"{gib(m.activations + m.backward_buffers)} {gib(m.total)}")
    return "\n".join(lines + ["", *format_qlora_fit(study.headline)])


def format_qlora_fit(f: QLoRAFit) -> list:
    """The QLoRA paper's headline, each term with its count and width."""
    gib = lambda b: f"{b / 2**30:7.2f} GiB"
    stat_bits = 8 * f.statistics / f.linear_weights
    terms = [("4-bit NF4 codes", f.linear_weights, "Linear weights x 4 bits", f.codes),
             ("statistics (double q.)", f.linear_weights, f"Linear weights x {stat_bits:.3f} bits", f.statistics),
             ("other weights, bf16", f.other_weights, "embeddings, head, norms x 2 B", f.other),
             ("LoRA weights, bf16", f.adapter_params, "x 2 B", f.adapter_weights),
             ("LoRA gradients, bf16", f.adapter_params, "x 2 B", f.adapter_gradients),
             ("LoRA master + AdamW", f.adapter_params, "x (4 + 8) B", f.adapter_optimizer)]
    lines = [f"the QLoRA paper's headline from the same formula: {f.shape}, LoRA r={f.lora_rank} on every "
             f"Linear of the blocks, batch {f.batch} x {f.seq} tokens, gradient checkpointing, bf16 mixed precision"]
    lines += [f"  {name:<23}{count:>15,} {width:<31}{gib(value)}" for name, count, width, value in terms]
    lines += [f"  {'activations':<23}{'block inputs, one block recomputed':>47}{gib(f.activations)}",
              f"  {'total':<70}{gib(f.total)} = {f.total / 1e9:.1f} GB: "
              f"{'fits' if f.fits else 'does not fit'} in one 48 GB GPU ({GPU_BYTES / 2**30:.0f} GiB)",
              f"  {'full fine-tuning, same setting':<70}{gib(f.full_total)}"]
    return lines


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


def budget_study(cfg: CompareConfig, progress: bool = True, sets=BUDGET_SETS) -> BudgetStudy:
    """Target sets at (nearly) one parameter budget, each LoRA (alpha = 2r) at its own learning
    rate chosen on validation from the grid, over the same seeds."""
    out = Path(cfg.out) / "budget"
    source, target = make_task(cfg.source), make_task(cfg.target, max_train=cfg.max_train)
    too_wide = [s.label for s in sets if s.r is not None and s.r > cfg.size.n_embd]
    if too_wide:
        raise ValueError(f"{too_wide} need a rank above the model width {cfg.size.n_embd}: "
                         f"use --n-embd >= {max(s.r for s in sets if s.r)}")
    base_dir = base_model(cfg, progress)
    base = load_model(base_dir)[0]
    target_before = target.evaluate(base)[target.metric]
    source_before = float(np.mean(list(source_scores(source, base).values())))
    shape = ModelShape.from_gpt_config(base.config)
    budget = shape.lora_parameters(sets[0].r, sets[0].target_modules)
    method, rows = METHODS["lora"], []
    for s in sets:
        r = s.r or matched_rank(shape, s.target_modules, budget)
        lora = replace(cfg.lora, r=r, lora_alpha=2 * r, target_modules=s.target_modules)
        choice = pick_lr(method, base_dir, target, cfg, lora)
        print(f"{s.label:>14} (r={r}) lr on validation (* chosen): {choice}")
        runs = [run_method(method, choice.chosen, seed, base_dir, source, target, cfg, lora, progress)
                for seed in cfg.seeds]
        folder = out / s.label.replace(" ", "_").replace(",", "").replace("=", "")
        summary = replace(summarize(method, choice, runs, base_dir, target, cfg, folder, lora), method=s.label)
        rows.append(BudgetRow(s.label, s.target_modules, r, lora.lora_alpha,
                              shape.lora_parameters(r, s.target_modules), summary))
    study = BudgetStudy(budget, rows, target_before, source_before, tuple(cfg.seeds))
    save_json(out / "results.json", {"budget": budget, "target_before": target_before,
                                     "source_before": source_before, "seeds": list(cfg.seeds),
                                     "rows": [asdict(row) for row in rows]})
    return study


def format_budget(study: BudgetStudy) -> str:
    """One line per target set (outcomes as mean [min-max] over seeds), then which gaps are real."""
    n = len(study.seeds)

    def steps(s: MethodSummary) -> str:
        if s.steps_to_90 is None:
            return "never"
        x = s.steps_to_90
        return f"{x.mean:.0f} [{x.min:.0f}-{x.max:.0f}]" + (f" ({s.reached_90}/{n})" if s.reached_90 < n else "")

    lines = [f"adapter parameters matched to {study.rows[0].label}: {study.budget:,}; "
             f"base: target {study.target_before:.3f}, source {study.source_before:.3f}",
             f"outcomes, mean [min-max] over seeds {list(study.seeds)} (retained: source skills, adapter on)",
             f"{'set':<15} {'modules':<18} {'r':>2} {'alpha':>5} {'adapter':>8} {'vs budget':>9} {'lr':>6} "
             f"{'target accuracy':>20} {'steps to 90%':>17} {'retained':>20}"]
    for row in study.rows:
        s = row.summary
        modules = row.target_modules if isinstance(row.target_modules, str) else ",".join(row.target_modules)
        lines.append(f"{row.label:<15} {modules:<18} {row.r:>2} {row.lora_alpha:>5g} {row.adapter_params:>8,} "
                     f"{row.adapter_params / study.budget - 1:>+9.1%} {s.lr.chosen:>6g} {str(s.target):>20} "
                     f"{steps(s):>17} {str(s.retained):>20}")
    return "\n".join([*lines, "", *verdicts([row.summary for row in study.rows])])
