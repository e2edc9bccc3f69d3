"""How long one training step of the GPT takes, in lora_numpy and (if installed) PyTorch.

    python benchmarks/train_step.py [--sizes tiny small medium] [--steps N] [--warmup W]
                                    [--threads T] [--no-torch] [--json PATH]

For each named model size, one training step is timed in three phases with time.perf_counter:
forward (logits and the cross-entropy loss), backward (loss.backward()), and optimizer (global
grad-norm clipping to 1.0, AdamW step, zero_grad), the same sequence as lora_numpy.train.
Batches are random token ids from a seeded generator, drawn outside the timed region.
The reported figure is the MEDIAN over the timed steps, after a few untimed warm-up steps
(first-touch allocations, BLAS thread start-up, optimizer state creation). The median, unlike
the mean, ignores the occasional step slowed by the garbage collector, the OS scheduler or
another process: we want the typical step, which is what a training run's length is made of.
tokens/s = batch * context / median step time.

With PyTorch installed (and no --no-torch) the SAME model runs in torch eager mode in the same
process: same architecture and module names, same initial weights (copied, so the first-step
losses agree, which the table shows as a check), same batch, float32, the same AdamW settings
and torch.set_num_threads equal to the thread count in use. Ratio = lora_numpy / torch (> 1:
lora_numpy is slower). The two take turns (a few timed steps each, ROUNDS times), so a change
in the machine's load during the run hits both alike instead of skewing the ratio.
With LORA_NUMPY_BACKEND=cupy the device is synchronised before each clock read.

lora_numpy_step(model, params) / torch_step(model, params) time a step that updates only
``params``, so the same code times LoRA against full fine-tuning. LoRA rows: r=8, alpha=16 on
q_proj, k_proj, v_proj, out_proj, fc1, fc2 (only the adapters trainable), lora_numpy's
get_peft_model against PEFT's inject_adapter_in_model on the torch twin (PEFT installed; skipped
otherwise). "lora/full" is lora_numpy's LoRA step over its own full step.

Matrix-product throughput: the script times a 2048x2048 by 2048x2048 float32 product with NumPy
(median of 5, lora_numpy's bands of one BLAS thread each, as every product in a step) as the
machine's peak, counts the multiply-adds of every matrix
product in a full step (each Linear's forward, input and weight gradients; attention's q kᵀ,
P v and their four backward products), and prints FLOPs of the step / step time / peak: the
fraction of the peak the whole step reaches, everything else (elementwise ops, Python, the
optimizer) included. With PyTorch, its own peak is timed the same way (torch.mm, same threads),
and each step is split in two: its products as if they ran at that library's peak (FLOPs / peak)
and the rest (step time minus that), which holds the elementwise ops, the framework's overhead
and the products' shortfall from the peak. "0.85x torch's step leaves the rest" is the time
lora_numpy's rest may take for a step of 0.85x PyTorch's (GOAL, the goal at small and medium in
the README's Speed section): GOAL x torch's step minus lora_numpy's products at its peak.
This script prints figures; it never passes or fails.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time

# size: (n_layer, n_head, n_embd, context, batch, vocab), and its default (warmup, steps)
SIZES = {"tiny": (2, 2, 64, 32, 16, 96), "small": (4, 4, 128, 64, 32, 96),
         "medium": (6, 6, 384, 128, 16, 96)}
DEFAULT_STEPS = {"tiny": (10, 100), "small": (5, 40), "medium": (3, 15)}
HP = dict(lr=3e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, grad_clip=1.0)  # train.py's
LORA = dict(r=8, lora_alpha=16, target_modules=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"))
GOAL = 0.85  # the full step's goal at small and medium, as a fraction of torch's (README, Speed)
ROUNDS = 5  # timed steps are taken in this many turns per implementation
PHASES = ("forward", "backward", "optimizer")
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

args = argparse.ArgumentParser(description=__doc__.split("\n")[0])
args.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
args.add_argument("--steps", type=int, help="timed steps per size (default: per size)")
args.add_argument("--warmup", type=int, help="untimed warm-up steps per size (default: per size)")
args.add_argument("--threads", type=int, help="threads for BLAS and torch (default: "
                  "OMP_NUM_THREADS, else the CPU count)")
args.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
args.add_argument("--json", metavar="PATH", help="also write the figures to this JSON file")
args = args.parse_args()

# BLAS libraries read their thread count when loaded, so set it before NumPy is imported.
if args.threads:
    for var in THREAD_VARS:
        os.environ[var] = str(args.threads)
    THREADS, THREADS_FROM = args.threads, "--threads"
elif os.environ.get("OMP_NUM_THREADS", "").isdigit():
    THREADS, THREADS_FROM = int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
else:
    THREADS, THREADS_FROM = os.cpu_count() or 1, "CPU count (OMP_NUM_THREADS unset)"

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import numpy as np  # noqa: E402

from lora_numpy import backend, parallel  # noqa: E402
from lora_numpy.models.gpt import GPT, GPTConfig  # noqa: E402
from lora_numpy.optim import AdamW, clip_grad_norm_  # noqa: E402
from lora_numpy.peft import LoraConfig, get_peft_model  # noqa: E402

try:  # optional: shows the BLAS pool NumPy really uses (lora_numpy's pool sets it to 1 thread)
    from threadpoolctl import threadpool_info
    BLAS = ", ".join(f"{p['internal_api']} {p['num_threads']} threads" for p in threadpool_info())
except ImportError:
    BLAS = "threadpoolctl not installed; NumPy's BLAS follows " + ", ".join(
        f"{v}={os.environ.get(v, 'unset')}" for v in THREAD_VARS)

torch = peft = None
if not args.no_torch:
    try:
        import torch
        torch.set_num_threads(THREADS)
    except ImportError:
        torch = None
    try:
        import peft
    except ImportError:
        peft = None


def now():
    """The clock, read after queued GPU work is done (it measures the work, not its launch)."""
    if backend.name == "cupy":
        backend.xp.cuda.Device().synchronize()
    return time.perf_counter()


def timed_step(prepare, forward, backward, update):
    """One training step as a function of a host batch (x, y) -> ((fwd, bwd, opt) ms, loss)."""
    def step(x, y):
        x, y = prepare(x), prepare(y)  # a host-to-device copy, if any, is not timed
        clock = [now()]
        loss = forward(x, y)
        clock.append(now())
        backward(loss)
        clock.append(now())
        update()
        clock.append(now())
        return [1000 * (b - a) for a, b in zip(clock, clock[1:])], loss
    return step


def decay_groups(params):
    """nanoGPT's rule, as in lora_numpy.optim: matrices decay, vectors (biases, gains) do not."""
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": HP["weight_decay"]},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def lora_numpy_step(model, params):
    """A timed training step of a lora_numpy ``model`` that updates only ``params``: all of
    them for full fine-tuning, just the adapters for LoRA. The loop of lora_numpy.train."""
    opt = AdamW(decay_groups(params), lr=HP["lr"], betas=HP["betas"], eps=HP["eps"])
    model.train()

    def update():
        clip_grad_norm_(params, HP["grad_clip"])
        opt.step()
        opt.zero_grad()
    return timed_step(backend.asarray, lambda x, y: model(x, y)[1], lambda loss: loss.backward(), update)


def torch_step(model, params):
    """The same step for a torch module, updating only ``params``."""
    opt = torch.optim.AdamW(decay_groups(params), lr=HP["lr"], betas=HP["betas"], eps=HP["eps"])
    model.train()

    def update():
        torch.nn.utils.clip_grad_norm_(params, HP["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
    return timed_step(torch.from_numpy, model, lambda loss: loss.backward(), update)


def measure(steps_by_name, batches, warmup, steps):
    """Warm each step function up, then time them on the same batches, taking turns in
    ROUNDS chunks (so a change in the machine's load hits every implementation alike).
    Returns {name: {phase: median ms, ..., "first_loss": loss at batch 0}}."""
    gc.collect()
    names = list(steps_by_name)
    times = {name: [] for name in names}
    first = {}
    chunks = np.array_split(np.arange(warmup, warmup + steps), min(ROUNDS, steps))
    plan = [(name, range(warmup)) for name in names]
    plan += [(name, chunk) for r, chunk in enumerate(chunks)
             for name in (names if r % 2 == 0 else names[::-1])]
    for name, indices in plan:
        for i in indices:
            ms, loss = steps_by_name[name](*batches(i))
            if name not in first:
                first[name] = float(loss.item())
            if i >= warmup:
                times[name].append(ms)
    out = {}
    for name in names:
        phases = dict(zip(PHASES, (statistics.median(col) for col in zip(*times[name]))))
        # the median of whole steps, not the sum of the phase medians
        out[name] = {"step": statistics.median(sum(ms) for ms in times[name]), **phases,
                     "first_loss": first[name]}
    return out


def torch_gpt(cfg):
    """lora_numpy's GPT in torch, with the same module names (so weights copy by name)."""
    nn, tF = torch.nn, torch.nn.functional

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            d = cfg.n_embd
            self.q_proj, self.k_proj = nn.Linear(d, d), nn.Linear(d, d)
            self.v_proj, self.out_proj = nn.Linear(d, d), nn.Linear(d, d)

        def forward(self, x):
            b, t, c = x.shape
            q, k, v = (p(x).view(b, t, cfg.n_head, c // cfg.n_head).transpose(1, 2)
                       for p in (self.q_proj, self.k_proj, self.v_proj))
            y = tF.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.out_proj(y.transpose(1, 2).reshape(b, t, c))

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
            self.fc2 = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

        def forward(self, x):
            return self.fc2(tF.gelu(self.fc1(x), approximate="tanh"))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.attn = nn.LayerNorm(cfg.n_embd), Attention()
            self.ln_2, self.mlp = nn.LayerNorm(cfg.n_embd), MLP()

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class TorchGPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
            self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
            self.blocks = nn.ModuleList(Block() for _ in range(cfg.n_layer))
            self.ln_f = nn.LayerNorm(cfg.n_embd)
            self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

        def forward(self, idx, targets):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
            for block in self.blocks:
                x = block(x)
            logits = self.lm_head(self.ln_f(x))
            return tF.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))
    return TorchGPT()


def matmul_peak_flops(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a large float32 product a @ b (n x n each) with NumPy: the machine's peak, in
    lora_numpy's bands (one BLAS thread each), as every product of a step runs."""
    rng = np.random.default_rng(0)
    a, b = (backend.asarray(rng.standard_normal((n, n), dtype=np.float32)) for _ in range(2))
    return 2 * n ** 3 / median_seconds(lambda: parallel.matmul(a, b), repeats)


def median_seconds(product, repeats: int) -> float:
    """Median wall time of ``product()`` over ``repeats`` calls, after one untimed warm-up call
    (threads start, memory is first touched)."""
    product()
    times = []
    for _ in range(repeats):
        t0 = now()
        product()
        times.append(now() - t0)
    return statistics.median(times)


def torch_matmul_peak_flops(n: int = 2048, repeats: int = 5) -> float:
    """The same peak for PyTorch: FLOP/s of an n x n by n x n float32 torch.mm, its own threads."""
    a, b = (torch.from_numpy(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
            for _ in range(2))
    return 2 * n ** 3 / median_seconds(lambda: torch.mm(a, b), repeats)


def step_matmul_flops(cfg, batch: int) -> int:
    """FLOPs (2 per multiply-add) of every matrix product in one full fine-tuning step."""
    n, d, t, v = batch * cfg.block_size, cfg.n_embd, cfg.block_size, cfg.vocab_size
    linear = 2 * n * (4 * d * d + 2 * d * 4 * d)          # q, k, v, out_proj, fc1, fc2 forward
    attention = 2 * 2 * batch * t * t * d                  # q kᵀ and P v, all heads together
    per_layer = 3 * linear + 3 * attention                # backward: 2 products per forward one
    return cfg.n_layer * per_layer + 3 * 2 * n * d * v    # + lm_head


def torch_lora(tmodel):
    """PEFT's LoRA on the torch twin (same r, alpha, targets); only the adapters trainable."""
    config = peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["lora_alpha"],
                             target_modules=list(LORA["target_modules"]))
    tmodel = peft.inject_adapter_in_model(config, tmodel)
    for name, p in tmodel.named_parameters():
        p.requires_grad_("lora_" in name)
    return tmodel


def bench_size(size, warmup, steps):
    n_layer, n_head, n_embd, context, batch, vocab = SIZES[size]
    cfg = GPTConfig(vocab_size=vocab, block_size=context, n_layer=n_layer, n_head=n_head,
                    n_embd=n_embd)
    model = GPT(cfg, seed=0)
    data = np.random.default_rng(1234).integers(0, vocab, size=(warmup + steps, batch, context + 1))
    xs, ys = np.ascontiguousarray(data[..., :-1]), np.ascontiguousarray(data[..., 1:])
    lora_model = get_peft_model(GPT(cfg, seed=0), LoraConfig(**LORA))
    steps_by_name = {"lora_numpy": lora_numpy_step(model, list(model.parameters())),
                     "LoRA np": lora_numpy_step(lora_model, [p for p in lora_model.parameters()
                                                             if p.requires_grad])}
    if torch is not None:
        def twin():  # the same initial weights, so the first losses must agree
            tmodel = torch_gpt(cfg)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    tmodel.get_parameter(name).copy_(torch.from_numpy(backend.to_numpy(p.data)))
            return tmodel
        tmodel = twin()
        steps_by_name["torch"] = torch_step(tmodel, list(tmodel.parameters()))
        if peft is not None:  # lora_B starts at 0 in both, so the first losses agree too
            tlora = torch_lora(twin())
            steps_by_name["LoRA peft"] = torch_step(tlora, [p for p in tlora.parameters()
                                                            if p.requires_grad])
    row = {"size": size, "config": dict(zip(("n_layer", "n_head", "n_embd", "context", "batch",
                                             "vocab"), SIZES[size])),
           "params": sum(int(np.prod(p.shape)) for p in model.parameters()),
           "warmup": warmup, "steps": steps}
    for name, ms in measure(steps_by_name, lambda i: (xs[i], ys[i]), warmup, steps).items():
        row[name] = {**ms, "tokens_per_s": batch * context / ms["step"] * 1000}
    ratio = lambda a, b: {k: row[a][k] / row[b][k] for k in ("step",) + PHASES}  # noqa: E731
    row["lora/full"] = ratio("LoRA np", "lora_numpy")
    if "torch" in row:
        row["ratio"] = ratio("lora_numpy", "torch")
    if "LoRA peft" in row:
        row["lora ratio"] = ratio("LoRA np", "LoRA peft")
    row["matmul_flops"] = step_matmul_flops(cfg, batch)
    row["fraction_of_peak"] = row["matmul_flops"] / (row["lora_numpy"]["step"] / 1000) / PEAK
    # The step split in two: products at the library's peak, and the rest (see the docstring).
    row["products_at_peak_ms"] = 1000 * row["matmul_flops"] / PEAK
    row["rest_ms"] = row["lora_numpy"]["step"] - row["products_at_peak_ms"]
    if "torch" in row:
        row["torch_products_at_peak_ms"] = 1000 * row["matmul_flops"] / TORCH_PEAK
        row["torch_rest_ms"] = row["torch"]["step"] - row["torch_products_at_peak_ms"]
        row["rest_for_goal_ms"] = GOAL * row["torch"]["step"] - row["products_at_peak_ms"]
    return row


def print_row(size, impl, r, ratio=False):
    fmt = "{:>8.2f}x" if ratio else "{:>9.2f}"
    cells = [fmt.format(r[k]) for k in ("step",) + PHASES]
    tps = "" if ratio else f"{r['tokens_per_s']:>10,.0f}  {r['first_loss']:.4f}"
    print(f"{size:<8}{impl:<12}{''.join(cells)}  {tps}", flush=True)


def main():
    print(f"lora_numpy train step | numpy {np.__version__} | backend {backend.name} | python "
          f"{platform.python_version()} | threads {THREADS} (from {THREADS_FROM})")
    print(f"BLAS: {BLAS}")
    print(f"lora_numpy pool: {parallel.threads} bands (LORA_NUMPY_THREADS, else OMP_NUM_THREADS)")
    if hasattr(os, "getloadavg"):  # anything else running slows every figure below
        print(f"load average before the run: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    if torch is not None:
        print(f"torch {torch.__version__} eager, set_num_threads({torch.get_num_threads()})")
    else:
        print("torch: " + ("skipped (--no-torch)" if args.no_torch else "not installed"))
    print("peft " + (peft.__version__ if peft is not None else "not installed: no PEFT LoRA rows"))
    print(f"LoRA: {LORA}")
    global PEAK, TORCH_PEAK
    PEAK = matmul_peak_flops()
    print(f"matrix-product peak (NumPy, 2048^3 float32 in {parallel.threads} bands, median of 5): {PEAK / 1e9:.1f} GFLOP/s")
    TORCH_PEAK = torch_matmul_peak_flops() if torch is not None else None
    if TORCH_PEAK is not None:
        print(f"matrix-product peak (torch.mm, 2048^3 float32, median of 5): {TORCH_PEAK / 1e9:.1f} GFLOP/s")
    print(f"AdamW lr={HP['lr']} betas={HP['betas']} eps={HP['eps']} wd={HP['weight_decay']} "
          f"(matrices), clip {HP['grad_clip']}; median ms over timed steps\n")
    print(f"{'size':<8}{'impl':<12}{'ms/step':>9}{'fwd':>9}{'bwd':>9}{'opt':>9}  "
          f"{'tokens/s':>10}  loss@1")
    rows = []
    for size in args.sizes:
        warmup, steps = DEFAULT_STEPS[size]
        warmup = max(0, warmup if args.warmup is None else args.warmup)
        steps = max(1, steps if args.steps is None else args.steps)
        print(f"{size}: n_layer, n_head, n_embd, context, batch, vocab = {SIZES[size]}; "
              f"{warmup} warm-up + {steps} timed steps", flush=True)
        row = bench_size(size, warmup, steps)
        print_row(size, "lora_numpy", row["lora_numpy"])
        if "torch" in row:
            print_row(size, "torch", row["torch"])
            print_row(size, "np/torch", row["ratio"], ratio=True)
        print_row(size, "LoRA np", row["LoRA np"])
        if "LoRA peft" in row:
            print_row(size, "LoRA peft", row["LoRA peft"])
            print_row(size, "np/peft", row["lora ratio"], ratio=True)
        print_row(size, "lora/full", row["lora/full"], ratio=True)
        print(f"{size:<8}full step: {row['matmul_flops'] / 1e9:.2f} GFLOP of matrix products, "
              f"{row['fraction_of_peak']:.0%} of the peak", flush=True)
        if "torch" in row:
            print(f"{size:<8}full step, ms = products at the peak + the rest: lora_numpy "
                  f"{row['products_at_peak_ms']:.1f} + {row['rest_ms']:.1f}, torch "
                  f"{row['torch_products_at_peak_ms']:.1f} + {row['torch_rest_ms']:.1f}; "
                  f"{GOAL}x torch's step leaves the rest {row['rest_for_goal_ms']:.1f}", flush=True)
        rows.append(row)
    if args.json:
        meta = {"numpy": np.__version__, "backend": backend.name, "threads": THREADS,
                "threads_from": THREADS_FROM, "blas": BLAS, "python": platform.python_version(),
                "torch": torch.__version__ if torch is not None else None, "hyperparameters": HP,
                "peft": peft.__version__ if peft is not None else None, "lora": LORA,
                "matmul_peak_flops": PEAK,
                "torch_matmul_peak_flops": TORCH_PEAK}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "sizes": rows}, f, indent=2,
                      default=lambda o: o.item() if hasattr(o, "item") else str(o))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
