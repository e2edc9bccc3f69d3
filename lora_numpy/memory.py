"""Floor 6: where the memory of a training step goes, counted from the arrays actually held,
measured at its peak, and predicted by formula.

    total = parameters (all, 4 bytes each in float32)
          + gradients (trainable only: a frozen weight gets none)
          + AdamW state (m and v: 2 × trainable)
          + activations (what the graph keeps alive for backward)

LoRA shrinks the middle two terms to almost nothing; the first stays (the frozen model is
still there) and so does most of the last (the activations flow through the frozen layers).
"""
from __future__ import annotations

import gc
import tracemalloc
from dataclasses import asdict, dataclass

from . import backend
from .autograd import topological_order
from .tensor import Tensor

FLOAT_BYTES = 4


@dataclass
class StepMemory:
    """Bytes held during one training step, by category."""
    params_trainable: int
    params_frozen: int
    gradients: int
    optimizer_state: int
    activations: int
    measured_peak: int  # the whole step's peak, measured by tracemalloc (CPU) or CuPy's pool

    @property
    def counted_total(self) -> int:
        return (self.params_trainable + self.params_frozen + self.gradients + self.optimizer_state
                + self.activations)

    def to_dict(self) -> dict:
        return {**asdict(self), "counted_total": self.counted_total}


def _buffer(a):
    """The array that owns the memory behind ``a`` (a view keeps its base alive)."""
    while getattr(a, "base", None) is not None and hasattr(a.base, "nbytes"):
        a = a.base
    return a


def graph_arrays(loss: Tensor) -> dict:
    """id -> array for every buffer the graph behind ``loss`` keeps alive: each node's output
    and every array its backward closure saved (views counted once, through their base)."""
    held = {}

    def add(a):
        if hasattr(a, "nbytes") and hasattr(a, "shape") and a.shape != ():
            root = _buffer(a)
            held[id(root)] = root
    for node in topological_order(loss):
        add(node.data)
        for cell in (node._backward.__closure__ or ()) if node._backward else ():
            value = cell.cell_contents
            for item in (value if isinstance(value, (tuple, list)) else (value,)):
                add(item.data if isinstance(item, Tensor) else item)
    return held


def activation_bytes(loss: Tensor, params) -> int:
    """Bytes the graph holds for backward, parameters excluded (they are counted apart)."""
    param_ids = {id(_buffer(p.data)) for p in params}
    return sum(a.nbytes for key, a in graph_arrays(loss).items() if key not in param_ids)


def measure_step(model, batch, loss_fn, optimizer) -> StepMemory:
    """Run one training step and account for its memory. Run a step first (warm-up), so that
    the optimizer state already exists, as it does on every step but the first."""
    params = model.parameters()
    trainable = [p for p in params if p.requires_grad]
    on_gpu = backend.name == "cupy"
    gc.collect()
    if on_gpu:
        pool = backend.xp.get_default_memory_pool()
        pool.free_all_blocks()  # the pool then grows to the step's high-water mark
    else:
        tracemalloc.start()
    optimizer.zero_grad()
    loss = loss_fn(model, batch)
    activations = activation_bytes(loss, params)
    loss.backward()
    gradients = sum(p.grad.nbytes for p in params if p.grad is not None)
    optimizer.step()
    param_bytes = sum(p.data.nbytes for p in params)
    state_bytes = optimizer_state_bytes(optimizer)
    if on_gpu:
        backend.xp.cuda.Device().synchronize()
        peak = pool.total_bytes()  # parameters live in the pool too
    else:
        # tracemalloc sees only what was allocated since start; what existed before is the
        # parameters and the optimizer state, added back here.
        peak = tracemalloc.get_traced_memory()[1] + param_bytes + state_bytes
        tracemalloc.stop()
    trainable_bytes = sum(p.data.nbytes for p in trainable)
    return StepMemory(
        params_trainable=trainable_bytes, params_frozen=param_bytes - trainable_bytes,
        gradients=gradients, optimizer_state=state_bytes,
        activations=activations, measured_peak=int(peak))


def optimizer_state_bytes(optimizer) -> int:
    return sum(v.nbytes for state in optimizer.state.values() for v in state.values()
               if hasattr(v, "nbytes"))


def analytic_step_memory(config, batch_size: int, seq_len: int, n_params: int, n_trainable: int,
                         lora_layers=(), num_labels: int | None = None) -> dict:
    """The same categories by formula, for a GPT of ``config`` on (batch_size, seq_len) tokens.

    Activations, counted per op of this implementation (N = B·T tokens, C = n_embd, H heads):
    every block keeps 25·N·C floats (LayerNorm outputs and normalised inputs 2+2, q/k/v 3,
    attention output and its re-layout 2, out_proj and residual 2, fc1 4, GELU output and its
    tanh 8, fc2 and residual 2) plus the attention matrix B·H·T²; the embeddings add 2·N·C + T·C
    and 8 bytes per token id, ln_f 2·N·C, and the LM head and loss 2·N·V (logits and
    log-probabilities). A LoRA layer (``F.lora_linear``) adds only its rank-r intermediate, N·r.
    ``lora_layers``: the rank r of each adapted layer. The formula assumes every op is
    recorded; with frozen embeddings nothing before the first adapter needs a gradient, so
    no graph is kept there and the measured activations come out slightly lower.
    """
    n, c, t = batch_size * seq_len, config.n_embd, seq_len
    per_block = 25 * n * c + batch_size * config.n_head * t * t
    floats = config.n_layer * per_block + 2 * n * c + t * c + 2 * n * c
    floats += 2 * n * config.vocab_size if num_labels is None else 2 * batch_size * num_labels
    floats += sum(n * r for r in lora_layers)
    return {"params": FLOAT_BYTES * n_params,
            "gradients": FLOAT_BYTES * n_trainable,
            "optimizer_state": 2 * FLOAT_BYTES * n_trainable,
            "activations": FLOAT_BYTES * floats + 8 * n}
