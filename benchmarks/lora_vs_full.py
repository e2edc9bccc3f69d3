"""LoRA against full fine-tuning: time and memory of one training step, measured.

    python benchmarks/lora_vs_full.py [--sizes tiny small medium] [--steps N] [--rank R] [--json PATH]

For each model size (the sizes of train_step.py) and each method (full fine-tuning; LoRA r=R on
q_proj,v_proj, PEFT's default; LoRA on every Linear but the head), it prints the median
ms/step over the timed steps (after warm-up), tokens/s, trainable parameters, and the memory of
one step from lora_numpy.memory.measure_step: the measured peak and its parts (parameters,
gradients, AdamW state, activations saved for backward). LoRA skips the weight gradient of every
frozen Linear (one of the three matrix products of a Linear's backward) and keeps no gradient
or optimizer state for it; it adds two thin products per adapted layer. Whether that nets out
as faster, and by how much memory, depends on size and batch: this script measures it.
Figures only; nothing passes or fails.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from lora_numpy import backend
from lora_numpy.memory import measure_step
from lora_numpy.models import GPT, GPTConfig
from lora_numpy.optim import AdamW, clip_grad_norm_
from lora_numpy.peft import LoraConfig, get_peft_model
from lora_numpy.train import default_loss

# size: (n_layer, n_head, n_embd, context, batch, vocab), as in train_step.py
SIZES = {"tiny": (2, 2, 64, 32, 16, 96), "small": (4, 4, 128, 64, 32, 96),
         "medium": (6, 6, 384, 128, 16, 96)}
DEFAULT_STEPS = {"tiny": (10, 60), "small": (3, 20), "medium": (2, 6)}


def build(method: str, config: GPTConfig, rank: int):
    model = GPT(config, seed=0)
    if method == "full":
        return model
    targets = ("q_proj", "v_proj") if method == "lora-qv" else "all-linear"
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))


def time_steps(model, batch, warmup: int, steps: int) -> float:
    """Median ms of a full training step (forward, backward, clip, AdamW) over ``steps``."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = AdamW(params, lr=1e-4)
    times = []
    for i in range(warmup + steps):
        if backend.name == "cupy":
            backend.xp.cuda.Device().synchronize()
        t0 = time.perf_counter()
        loss = default_loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        clip_grad_norm_(params, 1.0)
        optimizer.step()
        if backend.name == "cupy":
            backend.xp.cuda.Device().synchronize()
        if i >= warmup:
            times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--steps", type=int, help="timed steps per run (default: per size)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()

    mib = lambda n: n / 2**20  # noqa: E731
    print(f"backend {backend.name}, numpy {np.__version__}; LoRA r={args.rank}, alpha={2 * args.rank}")
    print(f"{'size':7}{'method':14}{'ms/step':>9}{'tokens/s':>10}{'trainable':>11}{'peak MiB':>10}"
          f"{'params':>8}{'grads':>8}{'AdamW':>8}{'activ.':>8}")
    figures = []
    for size in args.sizes:
        n_layer, n_head, n_embd, context, batch_size, vocab = SIZES[size]
        config = GPTConfig(vocab_size=vocab, block_size=context, n_layer=n_layer, n_head=n_head,
                           n_embd=n_embd)
        rng = np.random.default_rng(0)
        batch = (rng.integers(0, vocab, (batch_size, context)), rng.integers(0, vocab, (batch_size, context)))
        warmup, steps = DEFAULT_STEPS[size]
        steps = args.steps or steps
        for method in ("full", "lora-qv", "lora-all"):
            model = build(method, config, args.rank)
            ms = time_steps(model, batch, warmup, steps)
            optimizer = AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-9)
            measure_step(model, batch, default_loss, optimizer)  # creates the optimizer state
            mem = measure_step(model, batch, default_loss, optimizer)
            row = dict(size=size, method=method, ms_per_step=ms,
                       tokens_per_s=batch_size * context / (ms / 1000),
                       trainable=model.num_parameters(trainable_only=True), **mem.to_dict())
            figures.append(row)
            print(f"{size:7}{method:14}{ms:9.1f}{row['tokens_per_s']:10,.0f}{row['trainable']:11,}"
                  f"{mib(mem.measured_peak):10.1f}{mib(mem.params_trainable + mem.params_frozen):8.1f}"
                  f"{mib(mem.gradients):8.1f}{mib(mem.optimizer_state):8.1f}{mib(mem.activations):8.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
