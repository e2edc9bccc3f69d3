"""Floor 9: the command line, ``python -m lora_numpy COMMAND``.

    pretrain   train a base GPT on a task and save it
    compare    full fine-tuning vs LoRA vs PiSSA, side by side (the main job)
"""
from __future__ import annotations

import argparse
import sys

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
