"""Floor 8: the comparison's figures. Each function draws on a matplotlib ``Axes`` (so a
notebook can place it) and ``plot_comparison`` saves them as PNG files. Figures are built
with ``matplotlib.figure.Figure``, which needs no display: this works on a headless machine."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

COLORS = {"full": "#4c72b0", "lora": "#dd8452", "pissa": "#55a868"}
MEMORY_PARTS = [("params_frozen", "frozen parameters"), ("params_trainable", "trainable parameters"),
                ("gradients", "gradients"), ("optimizer_state", "AdamW state"),
                ("activations", "activations")]


def smooth(values, window: int = 20) -> np.ndarray:
    """Running mean over the last ``window`` values (shorter at the start), for noisy losses."""
    values = np.asarray(values, dtype=float)
    csum = np.concatenate([[0.0], np.cumsum(values)])
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (csum[idx] - csum[lo]) / (idx - lo)


def plot_losses(ax, runs) -> None:
    for run in runs:
        steps = [h["step"] for h in run["history"]]
        ax.plot(steps, smooth([h["loss"] for h in run["history"]]), label=run["method"],
                color=COLORS.get(run["method"]))
    ax.set(xlabel="step", ylabel="training loss (running mean of 20)", yscale="log",
           title="Fine-tuning loss")
    ax.legend()


def plot_target_metric(ax, runs, metric: str) -> None:
    key = f"target_{metric}"
    for run in runs:
        points = [(h["step"], h[key]) for h in run["history"] if key in h]
        if points:
            ax.plot(*zip(*points), marker="o", label=run["method"], color=COLORS.get(run["method"]))
    ax.set(xlabel="step", ylabel=f"held-out {metric}", title=f"Target task {metric}")
    ax.legend()


def plot_trainable(ax, runs) -> None:
    names = [r["method"] for r in runs]
    counts = [r["trainable_params"] for r in runs]
    bars = ax.bar(names, counts, color=[COLORS.get(n) for n in names])
    ax.bar_label(bars, labels=[f"{c:,}\n({r['trainable_percent']:.1f}%)" for c, r in zip(counts, runs)])
    ax.set(yscale="log", ylabel="trainable parameters (log scale)", title="What each method trains")
    ax.margins(y=0.3)


def plot_memory(ax, runs) -> None:
    names = [r["method"] for r in runs]
    bottom = np.zeros(len(runs))
    for key, label in MEMORY_PARTS:
        values = np.array([r["memory"][key] for r in runs]) / 2**20
        ax.bar(names, values, bottom=bottom, label=label)
        bottom += values
    peaks = [r["memory"]["measured_peak"] / 2**20 for r in runs]
    ax.scatter(names, peaks, color="black", marker="_", s=900, zorder=3, label="measured peak")
    ax.set(ylabel="MiB", title="Memory of one training step")
    ax.margins(y=0.35)  # room above the bars for the legend
    ax.legend(fontsize=8, ncols=2, loc="upper center")


def plot_comparison(runs, metric: str, out) -> list:
    """Save loss_curves.png, trainable_params.png and memory.png into ``out``; return paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_loss, ax_metric = fig.subplots(1, 2)
    plot_losses(ax_loss, runs)
    plot_target_metric(ax_metric, runs, metric)
    paths.append(out / "loss_curves.png")
    fig.savefig(paths[-1], dpi=110)
    for name, draw in (("trainable_params.png", plot_trainable), ("memory.png", plot_memory)):
        fig = Figure(figsize=(6, 4.5), layout="constrained")
        draw(fig.subplots(), runs)
        paths.append(out / name)
        fig.savefig(paths[-1], dpi=110)
    return paths
