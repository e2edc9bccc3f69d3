"""Floor 8: the experiments' figures. Each ``plot_*`` draws on a matplotlib ``Axes`` (so a notebook
can place it) and the ``save_*`` functions write PNG files through ``io.save_figure`` (atomic). Figures are
built with ``matplotlib.figure.Figure``, which needs no display: this works on a headless machine.
Every legend names each method's learning rate, chosen on the validation split."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from .io import save_figure
from .memory import GPU_BYTES

COLORS = {"full": "#4c72b0", "lora": "#dd8452", "pissa": "#55a868", "qlora": "#8172b3"}
MARKERS = {"full": "o", "lora": "s", "qlora": "^"}  # memory kinds
PARTS = (("weights", "weights"), ("gradients", "gradients"), ("optimizer_state", "optimizer state"),
         ("activations", "activations"), ("backward_buffers", "backward buffers"))


def smooth(values, window: int = 20) -> np.ndarray:
    """Running mean over the last ``window`` values (shorter at the start), for noisy losses."""
    values = np.asarray(values, dtype=float)
    csum = np.concatenate([[0.0], np.cumsum(values)])
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (csum[idx] - csum[lo]) / (idx - lo)


def label(summary) -> str:
    return f"{summary.method} (lr {summary.lr.chosen:g})"


def _band(ax, runs, key, color, name, transform=lambda v: v) -> None:
    """Mean over runs as a line, min-max over runs as a shaded band."""
    curves = []
    for run in runs:
        points = [(h["step"], h[key]) for h in run.history if key in h]
        curves.append(points)
    steps = [s for s, _ in curves[0]]
    values = np.array([transform(np.array([v for _, v in c])) for c in curves])
    ax.plot(steps, values.mean(0), color=color, label=name)
    ax.fill_between(steps, values.min(0), values.max(0), color=color, alpha=0.25, linewidth=0)


def plot_losses(ax, results) -> None:
    for s in results.summaries:
        runs = [r for r in results.runs if r.method == s.method]
        _band(ax, runs, "loss", COLORS.get(s.method), label(s), smooth)
    ax.set(xlabel="step", ylabel="training loss (running mean of 20)", yscale="log",
           title=f"Fine-tuning loss, {len(results.config.seeds)} runs: base k, seed k (band: min-max)")
    ax.legend()


def plot_target_metric(ax, results) -> None:
    key = f"target_{results.target_metric}"
    for s in results.summaries:
        runs = [r for r in results.runs if r.method == s.method]
        _band(ax, runs, key, COLORS.get(s.method), label(s))
    ax.axhline(0.9, color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="step", ylabel=f"held-out {results.target_metric}", ylim=(-0.02, 1.02),
           title=f"Target '{results.config.target}' from step 0 (band: min-max)")
    ax.legend(loc="lower right")


def plot_learning_vs_forgetting(ax, points, before_target: float, before_source: float) -> None:
    """points: (name, color, marker, target Spread, retained Spread), one per method (and rank).
    Up is learning more, right is forgetting less (Biderman et al. 2024's signature plot)."""
    for name, color, marker, target, retained in points:
        ax.errorbar(retained.mean, target.mean - before_target, xerr=_range(retained), yerr=_range(target),
                    fmt=marker, color=color, label=name, capsize=3, markersize=7)
    ax.axvline(before_source, color="grey", linestyle=":", linewidth=1, label="base model (source)")
    ax.set(xlabel="source accuracy retained (mean over skills, adapter on)",
           ylabel="target accuracy gained", title="Learning vs forgetting (bars: min-max over runs)")
    ax.legend(fontsize=7, ncols=2 if len(points) > 6 else 1, loc="lower right")  # points sit up and left


def forgetting_points(summaries, marker="o"):
    return [(label(s), COLORS.get(s.method), marker, s.target, s.retained) for s in summaries]


def _range(spread) -> list:
    """[[below], [above]] the mean for errorbar (never negative, despite rounding)."""
    return [[max(spread.mean - spread.min, 0.0)], [max(spread.max - spread.mean, 0.0)]]


def plot_comparison(results, out) -> list:
    """Save loss_curves.png and learning_vs_forgetting.png into ``out``; return their paths."""
    out = Path(out)
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_loss, ax_metric = fig.subplots(1, 2)
    plot_losses(ax_loss, results)
    plot_target_metric(ax_metric, results)
    paths = [save_figure(out / "loss_curves.png", fig)]
    fig = Figure(figsize=(6, 4.5), layout="constrained")
    plot_learning_vs_forgetting(fig.subplots(), forgetting_points(results.summaries), results.target_before.mean,
                                float(np.mean([v.mean for v in results.source_before.values()])))
    paths.append(save_figure(out / "learning_vs_forgetting.png", fig))
    return paths


def plot_rank_study(ax_target, ax_source, study) -> None:
    """Target accuracy and source retained against the rank, full fine-tuning as the reference."""
    full = study.full
    for ax, get, what in ((ax_target, lambda s: s.target, "target accuracy"),
                          (ax_source, lambda s: s.retained, "source retained (adapter on)")):
        ref = get(full)
        ax.axhline(ref.mean, color=COLORS["full"], label=f"{label(full)}, all weights")
        ax.axhspan(ref.min, ref.max, color=COLORS["full"], alpha=0.15, linewidth=0)
        for method in ("lora", "pissa"):
            rows = [(r, s) for r, s in study.by_rank if s.method == method]
            if not rows:
                continue
            spreads = [get(s) for _, s in rows]
            ranks = [r for r, _ in rows]
            err = np.hstack([_range(sp) for sp in spreads])
            ax.errorbar(ranks, [sp.mean for sp in spreads], yerr=err, marker="o", capsize=3, color=COLORS[method],
                        label=f"{method} (lr {rows[0][1].lr.chosen:g})")
        ax.set(xscale="log", xlabel="rank r (alpha = 2r)", ylabel=what, ylim=(-0.02, 1.02), title=what)
        ax.set_xticks(study.ranks, [str(r) for r in study.ranks])
        ax.legend(fontsize=8)


def rank_forgetting_points(study) -> list:
    """Learning-vs-forgetting points for the rank study: full fine-tuning, then one per method and rank."""
    markers = dict(zip(study.ranks, "v^<>sDph"))
    full = study.full
    return [(f"{label(full)}", COLORS["full"], "o", full.target, full.retained)] + [
        (f"{s.method} r={r}", COLORS[s.method], markers[r], s.target, s.retained) for r, s in study.by_rank]


def save_rank_study(study, out) -> Path:
    fig = Figure(figsize=(16, 4.5), layout="constrained")
    ax_target, ax_source, ax_both = fig.subplots(1, 3)
    plot_rank_study(ax_target, ax_source, study)
    plot_learning_vs_forgetting(ax_both, rank_forgetting_points(study), study.target_before, study.source_before)
    return save_figure(Path(out) / "rank_study.png", fig)


def plot_memory_vs_params(ax, study) -> None:
    """Peak step memory against parameter count, log-log; measured points filled, projected hollow."""
    for row in study.measured:
        ax.scatter(row.params, row.measured_peak, color=COLORS[row.method], marker=MARKERS[row.method],
                   s=40, zorder=3)
    for precision, line in (("float32", "-"), ("mixed", "--")):
        for method, marker in MARKERS.items():
            color = COLORS[method]
            # the float32 line starts at the measured sizes: the formula there, beside each measurement
            points = [(m.params, m.formula.total) for m in study.measured
                      if m.method == method and precision == "float32"]
            points += [(r.params, r.memory.total) for r in study.projected
                       if r.method == method and r.precision.startswith(precision)]
            if points:
                ax.plot(*zip(*points), line, color=color, marker=marker, markerfacecolor="white",
                        label=f"{method}, {precision}: formula (hollow)")
    ax.scatter([], [], color="black", marker="o", label="measured here (filled)")
    fit = study.headline  # the QLoRA paper's setting: r=64, 1 x 512 tokens, gradient checkpointing
    ax.axhline(GPU_BYTES, color="gray", linestyle=":", label="one 48 GB GPU")
    ax.scatter(fit.linear_weights + fit.other_weights, fit.total, color=COLORS["qlora"], marker="*", s=120,
               zorder=3, label=f"{fit.shape} QLoRA, the paper's setting (formula)")
    ax.set(xscale="log", yscale="log", xlabel="parameters", ylabel="peak bytes of one training step",
           title="Memory across scales")
    ax.legend(fontsize=7, loc="upper left")


def plot_memory_split(ax, study, shape_name: str) -> None:
    """Weights, gradients, optimizer state and activations of one projected model, full vs LoRA,
    side by side on a log axis (so LoRA's small parts stay visible)."""
    rows = [r for r in study.projected if r.shape == shape_name]
    width = 0.8 / len(rows)
    x = np.arange(len(PARTS))
    for i, row in enumerate(rows):
        values = [getattr(row.memory, key) / 2**30 for key, _ in PARTS]
        ax.bar(x + i * width, values, width, color=COLORS[row.method], alpha=1.0 if row.precision.startswith("mixed") else 0.5,
               label=f"{row.method}, {row.precision.split(' ')[0]}")
    ax.set_xticks(x + 0.4 - width / 2, [name for _, name in PARTS], rotation=15)
    ax.set(yscale="log", ylabel="GiB (log scale)", title=f"{shape_name}: where the memory goes")
    ax.legend(fontsize=7)


def save_memory_study(study, out) -> Path:
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    ax_scale, ax_split = fig.subplots(1, 2)
    plot_memory_vs_params(ax_scale, study)
    plot_memory_split(ax_split, study, study.split_shape)
    return save_figure(Path(out) / "memory_scales.png", fig)
