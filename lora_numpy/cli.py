"""Floor 9: the command line, ``python -m lora_numpy COMMAND``.

    pretrain   train a base GPT on a task and save it
    compare    full fine-tuning vs LoRA vs PiSSA, side by side (the main job)
"""
from __future__ import annotations

import argparse
import sys

from .experiments import DEFAULT_LR, METHODS, CompareConfig, compare
from .recipes import TASK_NAMES, ModelSize, pretrain


def _add_model_size(p: argparse.ArgumentParser) -> None:
    d = ModelSize()
    p.add_argument("--n-layer", type=int, default=d.n_layer, help="Transformer blocks (default %(default)s)")
    p.add_argument("--n-head", type=int, default=d.n_head, help="attention heads (default %(default)s)")
    p.add_argument("--n-embd", type=int, default=d.n_embd, help="model width (default %(default)s)")


def _cmd_pretrain(args) -> int:
    size = ModelSize(args.n_layer, args.n_head, args.n_embd)
    _, report = pretrain(args.task, args.steps, args.out, size, args.batch_size, args.lr, args.seed,
                         args.text_file, progress=not args.quiet)
    print(f"pretrained a {report['parameters']:,}-parameter GPT on '{args.task}' for {args.steps} steps "
          f"in {report['train_seconds']:.1f}s (final training loss {report['final_loss']:.4f})")
    if "accuracy" in report:
        print(f"held-out exact-match accuracy: {report['accuracy']:.1%}")
    if "val_loss" in report:
        print(f"validation loss: {report['val_loss']:.4f}")
    print(f"saved to {args.out}/ (model.npz, config.json, history.csv)")
    return 0


def _cmd_compare(args) -> int:
    lr = {m: v for m, v in (("full", args.lr_full), ("lora", args.lr_lora), ("pissa", args.lr_pissa))
          if v is not None}
    targets = args.target_modules[0] if len(args.target_modules) == 1 and args.target_modules[0] == "all-linear" \
        else tuple(args.target_modules)
    cfg = CompareConfig(source=args.source, target=args.target, methods=tuple(args.methods), r=args.rank,
                        lora_alpha=args.alpha, target_modules=targets, steps=args.steps,
                        batch_size=args.batch_size, lr=lr, seed=args.seed, base_steps=args.base_steps,
                        size=ModelSize(args.n_layer, args.n_head, args.n_embd),
                        eval_every=args.eval_every, out=args.out, cache=args.cache)
    results = compare(cfg, progress=not args.quiet)
    print()
    print(f"fine-tuning '{cfg.source}' -> '{cfg.target}', {cfg.steps} steps each, seed {cfg.seed}, "
          f"LoRA/PiSSA r={cfg.r} alpha={cfg.lora_alpha} on {cfg.target_modules}")
    print(results["table"])
    print(f"\nfinished in {results['seconds']:.0f}s; wrote {cfg.out}/results.json, history.csv and "
          + ", ".join(p.rsplit("/", 1)[-1] for p in results["plots"]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lora_numpy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="train a base GPT from scratch and save it",
                       description="Train a base GPT from scratch on a task and save it.")
    p.add_argument("--task", default="add", choices=[t for t in TASK_NAMES if t != "sum"],
                   help="what to learn (default %(default)s)")
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps (default %(default)s)")
    p.add_argument("--out", default="runs/base", help="output folder (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="default %(default)s")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="default %(default)s")
    p.add_argument("--text-file", default=None, help="with --task text: your own UTF-8 text file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_model_size(p)
    p.set_defaults(func=_cmd_pretrain)

    d = CompareConfig()
    p = sub.add_parser("compare", help="full fine-tuning vs LoRA vs PiSSA, side by side (the main job)",
                       description="Pretrain (or reuse) a base model on --source, fine-tune copies of it "
                                   "on --target with each method, and report what each costs and achieves.")
    p.add_argument("--methods", nargs="+", default=list(d.methods), choices=METHODS, help="default: all three")
    p.add_argument("--source", default=d.source, choices=[t for t in TASK_NAMES if t not in ("sum", "text")],
                   help="pretraining task (default %(default)s)")
    p.add_argument("--target", default=d.target, choices=[t for t in TASK_NAMES if t != "text"],
                   help="fine-tuning task; 'sum' is sequence classification (default %(default)s)")
    p.add_argument("--rank", type=int, default=d.r, help="LoRA/PiSSA rank r (default %(default)s)")
    p.add_argument("--alpha", type=float, default=d.lora_alpha, help="lora_alpha; scale = alpha/r (default %(default)s)")
    p.add_argument("--target-modules", nargs="+", default=[d.target_modules],
                   help="Linear layers to adapt, e.g. q_proj v_proj (default %(default)s)")
    p.add_argument("--steps", type=int, default=d.steps, help="fine-tuning steps per method (default %(default)s)")
    for method in METHODS:
        p.add_argument(f"--lr-{method}", type=float, default=None,
                       help=f"learning rate for {method} (default {DEFAULT_LR[method]})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="default %(default)s")
    p.add_argument("--seed", type=int, default=d.seed, help="default %(default)s")
    p.add_argument("--base-steps", type=int, default=d.base_steps, help="pretraining steps (default %(default)s)")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="default %(default)s")
    p.add_argument("--out", default=d.out, help="output folder (default %(default)s)")
    p.add_argument("--cache", default=d.cache, help="where base models are cached (default %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_model_size(p)
    p.set_defaults(func=_cmd_compare)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
