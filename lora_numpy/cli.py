"""Floor 9: the command line, ``python -m lora_numpy COMMAND``.

    pretrain   train a base GPT on a task and save it (--task mlm: an encoder, BERT's masked LM)
    compare    full fine-tuning vs LoRA vs PiSSA, side by side (the main job): one base per seed,
               each method's learning rate chosen on validation data over the bases, outcomes
               over (base, seed) pairs, verdicts pair by pair;
               --target ner | translate | docs for the text tasks;
               --study lowdata | rank | forgetting | variance | memory | budget for the longer studies
"""
from __future__ import annotations

import argparse
import os
import sys

from dataclasses import replace

from .cli_checks import (check_compare_args, check_compare_folders, check_pretrain_args, check_targets,
                         os_error_line, output_lock)
from .experiments import (METHODS, CompareConfig, compare, config_for, forgetting_study, format_memory,
                          format_retention, format_table, format_variance, lowdata, memory_study, rank_study,
                          variance_study)
from .experiments.studies import budget_study, format_budget
from .recipes import ARITHMETIC_OPS, LM_TASKS, TARGETS, ModelSize, pretrain


def _language_task(name: str) -> str:
    """argparse type: a task `pretrain` can train, or arithmetic skills joined by commas."""
    parts = name.split(",")
    if (len(parts) == 1 and name not in LM_TASKS) or (len(parts) > 1 and not set(parts) <= set(ARITHMETIC_OPS)):
        raise argparse.ArgumentTypeError(f"{name!r} is not one of {', '.join(LM_TASKS)} "
                                         "or arithmetic skills joined by commas (e.g. add,sub)")
    return name


def _add_model_size(p: argparse.ArgumentParser) -> None:
    d = ModelSize()
    p.add_argument("--n-layer", type=int, default=d.n_layer, help="Transformer blocks (default %(default)s)")
    p.add_argument("--n-head", type=int, default=d.n_head, help="attention heads (default %(default)s)")
    p.add_argument("--n-embd", type=int, default=d.n_embd, help="model width (default %(default)s)")


def _cmd_pretrain(args) -> int:
    size = ModelSize(args.n_layer, args.n_head, args.n_embd)
    _, report = pretrain(args.task, args.steps, args.out, size, args.batch_size, args.lr, args.seed,
                         args.text_file, progress=not args.quiet)
    kind = "GPT" if args.task != "mlm" else "encoder (bidirectional GPT)"
    print(f"pretrained a {report['parameters']:,}-parameter {kind} on '{args.task}' for {args.steps} steps "
          f"in {report['train_seconds']:.1f}s (final training loss {report['final_loss']:.4f})")
    if "accuracy" in report:
        print(f"held-out exact-match accuracy: {report['accuracy']:.1%}")
    if "val_loss" in report:
        print(f"validation loss: {report['val_loss']:.4f}")
    print(f"saved to {args.out}/ (model.npz, config.json, history.csv)")
    return 0


def _compare_config(args) -> CompareConfig:
    """The target's defaults (``config_for``), changed by the flags given (None: not given)."""
    d = config_for(args.target, source=args.source)
    given = lambda value, default: default if value is None else value  # noqa: E731
    modules = given(args.target_modules, None)
    targets = d.lora.target_modules if modules is None else (
        modules[0] if modules == ["all-linear"] else tuple(modules))
    steps = given(args.steps, d.train.steps)
    lr = {m: getattr(args, f"lr_{m}") for m in METHODS if getattr(args, f"lr_{m}") is not None}
    return replace(
        d, methods=tuple(given(args.methods, d.methods)),
        lora=replace(d.lora, r=args.rank, lora_alpha=args.alpha, target_modules=targets),
        train=replace(d.train, steps=steps, batch_size=given(args.batch_size, d.train.batch_size),
                      eval_every=given(args.eval_every, d.train.eval_every),
                      warmup_steps=round(d.train.warmup_steps * steps / d.train.steps)),
        seeds=tuple(args.seeds), lr=lr, max_train=args.max_train,
        base_steps=given(args.base_steps, d.base_steps), size=ModelSize(args.n_layer, args.n_head, args.n_embd),
        out=args.out, cache=args.cache)


def _check_compare(args) -> None:
    """The flags, then the LoRA settings against (a skeleton of) the model compare fine-tunes."""
    check_compare_args(args)
    cfg = _compare_config(args)
    if any(METHODS[m].has_adapter for m in cfg.methods):
        check_targets(cfg.lora, cfg.target, cfg.size.n_layer)
    check_compare_folders(args)


def _cmd_compare(args) -> int:
    cfg = _compare_config(args)
    if args.study == "memory":
        study = memory_study(cfg.out, progress=not args.quiet)
        print("\n" + format_memory(study))
        print(f"\nwrote {cfg.out}/memory.json and {study.plot.rsplit('/', 1)[-1]}")
        return 0
    if args.study == "rank":
        study = rank_study(cfg, progress=not args.quiet)
        print(f"\nwrote {cfg.out}/rank/results.json and {study.plot.rsplit('/', 1)[-1]}")
        return 0
    if args.study == "budget":
        study = budget_study(cfg, progress=not args.quiet)
        print("\n" + format_budget(study))
        print(f"\nwrote {cfg.out}/budget/results.json")
        return 0
    if args.study == "variance":
        print("\n" + format_variance(variance_study(cfg, progress=not args.quiet)))
        print(f"\nwrote {cfg.out}/variance/results.json")
        return 0
    run = {"lowdata": lowdata, "forgetting": forgetting_study}.get(args.study, compare)
    results = run(cfg, progress=not args.quiet)
    c = results.config
    print(f"\nfine-tuning '{c.source}' -> '{c.target}'"
          + (f" ({c.max_train} training examples)" if c.max_train else "")
          + f", {c.train.steps} steps per run, LoRA/PiSSA r={c.lora.r} alpha={c.lora.lora_alpha:g} "
          f"on {c.lora.target_modules}; bases: " + "; ".join(
              f"seed {seed} " + ", ".join(f"{k.removeprefix('accuracy_')} {v:.3f}" for k, v in b.items()
                                          if k.startswith(("accuracy_", "val_loss")))
              for seed, b in results.bases.items()))
    print(format_table(results))
    if args.study == "forgetting":
        print("\n" + format_retention(results))
    print(f"\nfinished in {results.seconds:.0f}s; wrote {c.out}/results.json, history.csv and "
          + ", ".join(p.rsplit("/", 1)[-1] for p in results.plots))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lora_numpy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="train a base GPT from scratch and save it",
                       description="Train a base GPT from scratch on a task and save it.")
    p.add_argument("--task", default="add", type=_language_task,
                   help="what to learn: arithmetic skills, text, or the text tasks' base on the stdlib "
                        "documentation: causal (a decoder) or mlm (an encoder, masked LM) (default %(default)s)")
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps (default %(default)s)")
    p.add_argument("--out", default="runs/base", help="output folder (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="default %(default)s")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="default %(default)s")
    p.add_argument("--text-file", default=None, help="with --task text: your own UTF-8 text file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_model_size(p)
    p.set_defaults(func=_cmd_pretrain, check=check_pretrain_args)

    d = CompareConfig()
    p = sub.add_parser("compare", help="full fine-tuning vs LoRA vs PiSSA, side by side (the main job)",
                       description="Pretrain (or reuse) a base model on --source skills, choose each method's "
                                   "learning rate on a validation split, fine-tune copies of the base on "
                                   "--target over several seeds, and report what each costs and achieves.")
    p.add_argument("--study", default="main",
                   choices=["main", "lowdata", "rank", "forgetting", "variance", "memory", "budget"],
                   help="main: the comparison; lowdata: the same with few target examples; rank: LoRA and "
                        "PiSSA across ranks; forgetting: the comparison on a target that shares no circuit with "
                        "the sources (mul), with each skill's retention; variance: how much an outcome moves "
                        "with the base, the seed and the thread count; memory: measured and projected step "
                        "memory; budget: LoRA on q,v vs every Linear vs the MLP at one parameter budget "
                        "(default %(default)s)")
    p.add_argument("--methods", nargs="+", default=None, choices=list(METHODS),
                   help=f"default: {' '.join(d.methods)} (text targets: full lora pissa)")
    p.add_argument("--source", default=None, type=_language_task, help="pretraining skills, comma-joined, from "
                   f"{', '.join(ARITHMETIC_OPS)} (default {d.source}); for a text target the text base: "
                   "mlm (an encoder, ner's default) or causal (a decoder)")
    p.add_argument("--target", default=d.target, choices=list(TARGETS),
                   help="fine-tuning task; 'sum' is sequence classification; ner, translate, docs are the "
                        "text tasks (default %(default)s)")
    p.add_argument("--rank", type=int, default=d.lora.r, help="LoRA/PiSSA rank r (default %(default)s)")
    p.add_argument("--alpha", type=float, default=d.lora.lora_alpha, help="lora_alpha; scale = alpha/r (default %(default)s)")
    p.add_argument("--target-modules", nargs="+", default=None,
                   help=f"Linear layers to adapt, e.g. q_proj v_proj (default {d.lora.target_modules}; "
                        "text targets: the blocks' Linears)")
    per_target = "; text targets: see side_by_side.TEXT_DEFAULTS"
    p.add_argument("--steps", type=int, default=None,
                   help=f"fine-tuning steps per run (default {d.train.steps}{per_target})")
    p.add_argument("--seeds", type=int, nargs="+", default=list(d.seeds),
                   help="seed k pretrains base k and fine-tunes it (default %(default)s)")
    for name, method in METHODS.items():
        p.add_argument(f"--lr-{name}", type=float, default=None,
                       help=f"fix {name}'s learning rate instead of choosing from {list(method.lr_grid)} "
                            "(text targets: side_by_side.TEXT_DEFAULTS)")
    p.add_argument("--max-train", type=int, default=d.max_train, help="target training examples (default: all)")
    p.add_argument("--batch-size", type=int, default=None, help=f"default {d.train.batch_size}{per_target}")
    p.add_argument("--base-steps", type=int, default=None,
                   help=f"pretraining steps (default {d.base_steps}{per_target})")
    p.add_argument("--eval-every", type=int, default=None, help=f"default {d.train.eval_every}{per_target}")
    p.add_argument("--out", default=d.out, help="output folder (default %(default)s)")
    p.add_argument("--cache", default=d.cache, help="where base models are cached (default %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_model_size(p)
    p.set_defaults(func=_cmd_compare, check=_check_compare)
    return parser


def main(argv=None) -> int:
    """Check every flag (in well under a second), then run the command while holding the lock
    on its --out folder. Errors are one line, ``error: ...`` on stderr, exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        args.check(args)
        with output_lock(args.out):
            code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not as a traceback at interpreter exit
        return code
    except BrokenPipeError:  # the reader left (`compare | head -1`): stop quietly, as SIGPIPE would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 128 + 13
    except OSError as err:  # read-only folder, disk full, a file where a folder should be
        print(f"error: {os_error_line(err)}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
