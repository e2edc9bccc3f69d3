"""Floor 8: the tables and verdict lines a comparison prints.

    learning rates   every grid value's validation score, mean [min-max] over the bases; * chosen
    costs            trainable parameters, file, frozen base, measured peak step memory, ms/step
    outcomes         mean [min-max] over the (base, seed) pairs: target at the end and at best,
                     steps to 90%, each source skill with the adapter on and off
    verdicts         each pair of methods, outcome by outcome, paired by base and seed
"""
from __future__ import annotations

import numpy as np

from .protocol import FAIL_FRACTION, Spread, aggregate, paired_verdict

RETAINED_FLOOR = 0.01  # one point of a source skill's accuracy (or 0.01 nats of a text base's loss)


def _size(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _grid(rows) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_lr_choices(choices: dict, metric: str, steps: int, bases) -> str:
    """One row per method (name -> LrChoice): each rate's validation score over the bases
    (* chosen, !n: it failed on n bases), then a line for each choice that sits on an edge."""
    rates = sorted({lr for c in choices.values() for lr in c.grid})
    rows = [["method", *[f"{lr:g}" for lr in rates]]]
    for name, c in choices.items():
        cells = {c.chosen: "fixed*"} if not c.scores else {
            lr: f"{aggregate(scores)}{'*' if lr == c.chosen else ' '}{f'!{failed}' if failed else '  '}"
            for lr, scores, failed in zip(c.grid, c.scores, c.failed)}
        rows.append([name, *[cells.get(lr, "-") for lr in rates]])
    lines = [f"learning rate: validation {metric} after {steps} steps, mean [min-max] over bases "
             f"{list(bases)} (* chosen: the best mean; !n: failed on n bases, scoring under "
             f"{FAIL_FRACTION:g} x the best rate's score there)", _grid(rows)]
    lines += [f"  {name}: {c.chosen:g} is an edge, {c.edge}" for name, c in choices.items() if c.edge]
    return "\n".join(lines)


def runs_by_method(runs) -> dict:
    """method -> its runs, in the order of their seeds (so that index k pairs run k of every method)."""
    out = {}
    for r in sorted(runs, key=lambda r: r.seed):
        out.setdefault(r.method, []).append(r)
    return out


def verdicts(runs, noise_floor: float, eval_every: int, steps: int, retained: str = "retained") -> list:
    """For each pair of methods (in the order of ``runs``) and each outcome, the paired verdict.
    ``retained`` names the source outcome (a text base's: "source val_loss", where higher is worse).
    A run that never reached 90% counts as one evaluation past the end of training."""
    by_method = runs_by_method(runs)
    names = list(dict.fromkeys(r.method for r in runs))
    never = steps + eval_every
    kept = "higher" if retained == "retained" else "higher: kept less"  # a text base's loss
    outcomes = [("target", noise_floor, "higher", 3, lambda r: r.target_after),
                (retained, RETAINED_FLOOR, kept, 3, lambda r: float(np.mean(list(r.source_after.values())))),
                ("steps to 90%", eval_every, "slower", 0, lambda r: never if r.steps_to_90 is None else r.steps_to_90)]
    lines = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            ra, rb = by_method[a], by_method[b]
            for outcome, floor, more, digits, value in outcomes:
                if outcome == "steps to 90%" and all(r.steps_to_90 is None for r in ra + rb):
                    continue
                lines.append(paired_verdict(outcome, a, b, [value(r) for r in ra], [value(r) for r in rb],
                                            floor, more, digits))
    return lines


def verdict_rule(noise_floor: float, eval_every: int, n: int) -> str:
    return (f'paired over the {n} (base, seed) pairs: "A higher" only when A - B has one sign on every pair '
            f"and clears the noise floor on each (target {noise_floor:g}, source {RETAINED_FLOOR:g}, steps to 90% "
            f'{eval_every}: one evaluation); otherwise "no difference"')


def format_table(results) -> str:
    """The learning rates, the costs, the outcomes over the (base, seed) pairs, the verdicts."""
    cfg, n = results.config, len(results.config.seeds)
    rows = [["method", "lr", "trainable", "%", "file", "frozen base", "peak step", "ms/step"]]
    for s in results.summaries:  # frozen base: memory.params_frozen, by frozen_nbytes (full: none)
        frozen = _size(s.memory.params_frozen) if s.memory.params_frozen else "0 (all train)"
        rows.append([s.method, f"{s.lr.chosen:g}", f"{s.trainable_params:,}",
                     f"{100 * s.trainable_params / s.all_params:.2f}", _size(s.file_bytes), frozen,
                     _size(s.memory.measured_peak), f"{s.ms_per_step:.1f}"])
    skills = list(results.source_before)
    extra = [k for k, v in results.summaries[0].metrics.items()
             if k != results.target_metric and isinstance(v, Spread)]  # e.g. token accuracy beside entity F1
    metric = results.target_metric
    outcome = [["method", f"{metric} at end", "best", "rise, last 20%", *extra, "steps to 90%",
                *[f"{k} on" for k in skills], *[f"{k} off" for k in skills]]]
    outcome.append(["base", str(results.target_before), "", "", *["" for _ in extra], "",
                    *[str(v) for v in results.source_before.values()], *["" for _ in skills]])
    for s in results.summaries:
        steps = "never" if s.steps_to_90 is None else f"{s.steps_to_90.mean:.0f} [{s.steps_to_90.min:.0f}-{s.steps_to_90.max:.0f}]"
        if s.steps_to_90 is not None and s.reached_90 < n:
            steps += f" ({s.reached_90}/{n})"
        off = [str(s.source_adapter_off[k]) if s.source_adapter_off else "-" for k in skills]
        rise = f"{s.target_rise.mean:+.3f} [{s.target_rise.min:+.3f} to {s.target_rise.max:+.3f}]"
        curve = [str(s.target_best), rise] if np.isfinite(s.target_best.mean) else ["-", "-"]  # no curve to read
        outcome.append([s.method, str(s.target), *curve, *[str(s.metrics[k]) for k in extra], steps,
                        *[str(s.source[k]) for k in skills], *off])
    source = ("source skills' accuracy" if results.source_metric == "accuracy" else
              f"source: the base's held-out text {results.source_metric} (lower: more kept)")
    per_class = [f"{s.method:>5} {k} per class: "
                 + ", ".join(f"{c} {v:.2f}" for c, v in zip(results.class_names, values))
                 for s in results.summaries for k, values in s.metrics.items() if isinstance(values, list)]
    retained = "retained" if results.source_metric == "accuracy" else f"source {results.source_metric}"
    lines = verdicts(results.runs, results.noise_floor, cfg.train.eval_every, cfg.train.steps, retained)
    choices = {s.method: s.lr for s in results.summaries}
    return "\n".join([format_lr_choices(choices, metric, cfg.train.steps, cfg.seeds), "", _grid(rows), "",
                      f"outcomes on the test split, mean [min-max] over {n} runs, run k: base k fine-tuned "
                      f"with seed k, seeds {list(cfg.seeds)} ({source}, adapter on / off):", _grid(outcome),
                      *([""] + per_class if per_class else []), "",
                      verdict_rule(results.noise_floor, cfg.train.eval_every, n), *map(str, lines)])
