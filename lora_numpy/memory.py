"""Floor 6: where the memory of a training step goes, counted from the arrays actually held,
measured at its peak, and predicted by formula.

    total = parameters (all, 4 bytes each in float32)
          + gradients (trainable only: a frozen weight gets none)
          + AdamW state (m and v: 2 × trainable)
          + activations (what the graph keeps alive for backward)

LoRA shrinks the middle two terms to almost nothing; the first stays (the frozen model is
still there) and so does most of the last (the activations flow through the frozen layers).
The peak comes early in backward, with two more MLP-wide buffers alive (``backward_buffer_floats``).

``step_memory_formula`` writes this for any ``ModelShape`` (this engine's GPT, GPT-2, LLaMA), any
``Precision`` (float32 as here; bf16 mixed precision as real trainers) and any ``Finetuning`` kind,
so the formula checked against measurements here projects to models of billions of parameters.
"""
from __future__ import annotations

import gc
import tracemalloc
from dataclasses import asdict, dataclass

from . import backend
from .autograd import topological_order
from .nn import Linear4bit, frozen_nbytes
from .quant import bits_per_parameter
from .tensor import Tensor

@dataclass
class StepMemory:
    """Bytes held during one training step, by category."""
    params_trainable: int
    params_frozen: int     # the frozen base: frozen Parameters plus 4-bit codes and statistics
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
    """id -> array for every buffer the graph behind ``loss`` keeps alive: each node's output,
    its inputs' arrays and what its op declared it saved for backward (``Tensor.from_op``'s
    ``saved``); views counted once, through their base."""
    held = {}
    for node in topological_order(loss):
        for a in (node.data, *(parent.data for parent in node._prev), *node._saved):
            if hasattr(a, "nbytes") and a.shape != ():
                root = _buffer(a)
                held[id(root)] = root
    return held


def activation_bytes(loss: Tensor, stored) -> int:
    """Bytes the graph holds for backward, the model's own arrays excluded (``stored``: its
    parameters' arrays and 4-bit codes, counted apart as weights)."""
    stored_ids = {id(_buffer(a)) for a in stored}
    return sum(a.nbytes for key, a in graph_arrays(loss).items() if key not in stored_ids)


def measure_step(model, batch, loss_fn, optimizer) -> StepMemory:
    """Run one training step and account for its memory. Run a step first (warm-up), so that
    the optimizer state already exists, as it does on every step but the first."""
    params = model.parameters()
    trainable = [p for p in params if p.requires_grad]
    frozen = frozen_nbytes(model)  # frozen Parameters plus 4-bit layers' codes and statistics
    on_gpu = backend.name == "cupy"
    gc.collect()
    if on_gpu:
        pool = backend.xp.get_default_memory_pool()
        pool.free_all_blocks()  # the pool then grows to the step's high-water mark
    else:
        tracemalloc.start()
    optimizer.zero_grad()
    loss = loss_fn(model, batch)
    stored = [p.data for p in params]  # the model's own storage: parameters, 4-bit codes and statistics
    stored += [a for _, m in model.named_modules() if isinstance(m, Linear4bit) for a in (m.packed, m.quant_state)]
    activations = activation_bytes(loss, stored)
    loss.backward()
    gradients = sum(p.grad.nbytes for p in params if p.grad is not None)
    optimizer.step()
    trainable_bytes = sum(p.data.nbytes for p in trainable)
    state_bytes = optimizer_state_bytes(optimizer)
    if on_gpu:
        backend.xp.cuda.Device().synchronize()
        peak = pool.total_bytes()  # parameters live in the pool too
    else:
        # tracemalloc sees only what was allocated since start; what existed before is the
        # weights (trainable and frozen) and the optimizer state, added back here.
        peak = tracemalloc.get_traced_memory()[1] + trainable_bytes + frozen + state_bytes
        tracemalloc.stop()
    return StepMemory(
        params_trainable=trainable_bytes, params_frozen=frozen,
        gradients=gradients, optimizer_state=state_bytes,
        activations=activations, measured_peak=int(peak))


def optimizer_state_bytes(optimizer) -> int:
    return sum(v.nbytes for state in optimizer.state.values() for v in state.values()
               if hasattr(v, "nbytes"))


@dataclass(frozen=True)
class ModelShape:
    """The shape of a decoder-only Transformer, enough to count its parameters and activations.

    GPT style (this engine): LayerNorm with bias, learned positions, GELU MLP (fc1, fc2).
    LLaMA style: RMSNorm (weight only), rotary positions (no table), no biases, SwiGLU MLP with
    three matrices (gate_proj, up_proj, down_proj), grouped-query attention (``n_kv_head`` < n_head).
    """
    name: str
    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int
    block_size: int
    d_ff: int | None = None          # MLP width; None: 4 * n_embd
    n_kv_head: int | None = None     # heads of k and v; None: n_head
    llama: bool = False              # the LLaMA differences listed above
    tied_embeddings: bool = False    # lm_head shares wte's weight (GPT-2 does; this engine does not)

    @classmethod
    def from_gpt_config(cls, config, name: str = "gpt") -> "ModelShape":
        return cls(name, config.n_layer, config.n_embd, config.n_head, config.vocab_size, config.block_size)

    @property
    def mlp_width(self) -> int:
        return self.d_ff or 4 * self.n_embd

    @property
    def kv_width(self) -> int:
        return self.n_embd // self.n_head * (self.n_kv_head or self.n_head)

    def linears(self) -> dict:
        """name -> (d_in, d_out) of each Linear in one block (PEFT's target names)."""
        c, f, kv = self.n_embd, self.mlp_width, self.kv_width
        mlp = ({"gate_proj": (c, f), "up_proj": (c, f), "down_proj": (f, c)} if self.llama
               else {"fc1": (c, f), "fc2": (f, c)})
        return {"q_proj": (c, c), "k_proj": (c, kv), "v_proj": (c, kv), "out_proj": (c, c), **mlp}

    def linear_parameters(self) -> int:
        """Weights of the blocks' Linears (what QLoRA stores in 4 bits), biases excluded."""
        return self.n_layer * sum(i * o for i, o in self.linears().values())

    def num_parameters(self) -> int:
        c, bias = self.n_embd, not self.llama
        norm = c if self.llama else 2 * c                      # RMSNorm: weight; LayerNorm: weight, bias
        block = sum(i * o + (o if bias else 0) for i, o in self.linears().values()) + 2 * norm
        embeddings = self.vocab_size * c * (1 if self.tied_embeddings else 2)
        positions = 0 if self.llama else self.block_size * c
        return self.n_layer * block + embeddings + positions + norm

    def lora_parameters(self, r: int, targets="all-linear") -> int:
        """r·(d_in + d_out) for every adapted Linear of every block."""
        return self.n_layer * r * sum(i + o for name, (i, o) in self.linears().items()
                                      if targets == "all-linear" or name in targets)

    def activation_floats(self, batch: int, seq: int, lora_rank: int = 0, targets="all-linear",
                          gradient_checkpointing: bool = False) -> int:
        """Floats this engine keeps for backward (N = batch·seq tokens, C = n_embd, F = MLP width).

        Per block, counted per op of lora_numpy: two LayerNorms keep output and normalised input
        (4·N·C), q/k/v (N·(C + 2·kv)), the attention output (N·C; merging its heads is a view), out_proj
        and the residual sum (2·N·C), the MLP 3·N·F (fc1 output, GELU output and its tanh; for
        SwiGLU 4·N·F: gate, up, SiLU, product), fc2 and the residual (2·N·C), and the softmaxed
        attention matrix batch·H·seq². Outside the blocks: embeddings 2·N·C + seq·C, ln_f 2·N·C,
        logits and log-probabilities 2·N·V. A LoRA layer adds its rank-r intermediate, N·r.
        With gradient checkpointing (as Hugging Face does it) each block keeps only its input,
        N·C, and backward recomputes one block at a time: n_layer·N·C + one block's floats."""
        n, c = batch * seq, self.n_embd
        mlp = (4 if self.llama else 3) * n * self.mlp_width
        block = 9 * n * c + n * (c + 2 * self.kv_width) + mlp + batch * self.n_head * seq * seq
        adapted = sum(1 for name in self.linears() if targets == "all-linear" or name in targets)
        block += adapted * n * lora_rank
        outside = 2 * n * c + seq * c + 2 * n * c + 2 * n * self.vocab_size
        if gradient_checkpointing:
            return self.n_layer * n * c + block + outside
        return self.n_layer * block + outside

    def backward_buffer_floats(self, batch: int, seq: int) -> int:
        """At the step's peak, early in backward (the last block's MLP), every activation is still
        held and backward has just made two N×F buffers: the gradient of the MLP's hidden layer
        and the temporary its activation function's derivative needs."""
        return 2 * batch * seq * self.mlp_width


@dataclass(frozen=True)
class Precision:
    """Bytes per number in each role during a training step."""
    name: str
    weight_bytes: float       # every stored weight, frozen or trainable
    grad_bytes: float         # gradient, trainable weights only
    master_bytes: float       # a float32 copy of each trainable weight (mixed precision)
    optimizer_bytes: float    # AdamW's m and v per trainable weight
    activation_bytes: float


FLOAT32 = Precision("float32 (this engine)", 4, 4, 0, 8, 4)
# Mixed precision as PyTorch AMP / DeepSpeed train: bf16 weights, gradients and activations;
# float32 master weights and Adam moments: 2 + 2 + 4 + 4 + 4 = 16 bytes per trainable parameter
# (Rajbhandari et al. 2020, "ZeRO"), but a frozen parameter costs only its 2 bf16 bytes.
MIXED_BF16 = Precision("mixed bf16 (bf16 weights+grads, fp32 master+Adam)", 2, 2, 4, 8, 2)


@dataclass(frozen=True)
class Finetuning:
    """What a method trains and how it stores the frozen rest, for the memory formula."""
    name: str
    lora_rank: int | None = None         # None: every parameter trains (full fine-tuning)
    lora_targets: object = "all-linear"
    frozen_linear_bits: float | None = None  # None: the precision's width; QLoRA: QLORA_BITS


FULL = Finetuning("full")
LORA = Finetuning("lora", lora_rank=8)
# QLoRA stores the blocks' frozen Linear weights in 4-bit NF4, blocks of 64, with double-quantized
# statistics: 4 + 8/64 + 32/(64·256) ≈ 4.127 bits per weight. Everything else is as in LoRA: the
# other frozen weights at the precision's width (bf16 in mixed precision), the adapter trained
# in the mixed-precision recipe (bf16 weights and gradients, float32 master weights and AdamW).
QLORA_BITS = bits_per_parameter(blocksize=64, compress_statistics=True)
QLORA = Finetuning("qlora", lora_rank=8, frozen_linear_bits=QLORA_BITS)


@dataclass
class MemoryBreakdown:
    """Bytes of one training step, by what they hold."""
    weights: float            # all parameters (frozen and trainable)
    gradients: float
    optimizer_state: float    # AdamW m and v, plus master weights in mixed precision
    activations: float        # kept for backward
    backward_buffers: float   # transient, at the peak

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer_state + self.activations + self.backward_buffers


def step_memory_formula(shape: ModelShape, method: Finetuning, precision: Precision, batch: int,
                        seq: int, gradient_checkpointing: bool = False) -> MemoryBreakdown:
    """Peak memory of one training step of ``method`` on ``shape``, by formula.

    weights = frozen·w + trainable·w; gradients = trainable·g; optimizer = trainable·(master + m + v);
    activations = activation_floats·a + 8 bytes per token id; plus the backward buffers at the peak, ·a.
    With quantized frozen Linears (QLoRA) their weights cost frozen_linear_bits/8 bytes instead of w,
    and the peak also holds one dequantized copy (·w) of the largest Linear, the one being multiplied.
    The same formula is checked against measurements of this engine (float32) and then projected."""
    n_all = shape.num_parameters()
    full = method.lora_rank is None
    trainable = n_all if full else shape.lora_parameters(method.lora_rank, method.lora_targets)
    frozen = 0 if full else n_all
    weights = (frozen + trainable) * precision.weight_bytes
    dequantized = 0
    if method.frozen_linear_bits is not None and not full:  # quantized frozen Linear weights
        weights -= shape.linear_parameters() * (precision.weight_bytes - method.frozen_linear_bits / 8)
        dequantized = max(i * o for i, o in shape.linears().values()) * precision.weight_bytes
    act = shape.activation_floats(batch, seq, method.lora_rank or 0, method.lora_targets, gradient_checkpointing)
    return MemoryBreakdown(
        weights=weights, gradients=trainable * precision.grad_bytes,
        optimizer_state=trainable * (precision.master_bytes + precision.optimizer_bytes),
        activations=act * precision.activation_bytes + 8 * batch * seq,  # + the int64 token ids
        backward_buffers=shape.backward_buffer_floats(batch, seq) * precision.activation_bytes + dequantized)


# Shapes to project to (the published configurations), and the batch they are projected at.
GPT2_124M = ModelShape("GPT-2 124M", 12, 768, 12, 50257, 1024, tied_embeddings=True)
LLAMA2_7B = ModelShape("LLaMA-2 7B", 32, 4096, 32, 32000, 4096, d_ff=11008, llama=True)
LLAMA_65B = ModelShape("LLaMA 65B", 80, 8192, 64, 32000, 2048, d_ff=22016, llama=True)
LLAMA2_70B = ModelShape("LLaMA-2 70B", 80, 8192, 64, 32000, 4096, d_ff=28672, n_kv_head=8, llama=True)
PROJECTED_SHAPES = (GPT2_124M, LLAMA2_7B, LLAMA_65B, LLAMA2_70B)  # by size
# (method, precision) pairs projected: QLoRA is a mixed-precision recipe (bf16 compute on a 4-bit base)
PROJECTED_RUNS = ((FULL, FLOAT32), (LORA, FLOAT32), (FULL, MIXED_BF16), (LORA, MIXED_BF16), (QLORA, MIXED_BF16))
PROJECTION_BATCH, PROJECTION_SEQ = 1, 1024  # one sequence of 1024 tokens per step


# The QLoRA paper's headline (Dettmers et al. 2023, abstract and §1): fine-tuning a 65B model
# fits on one 48 GB GPU. Its setting, from the Guanaco 65B script: LLaMA 65B, NF4 with double
# quantization, LoRA r=64 on every Linear of the blocks, bf16, gradient checkpointing; the memory
# is counted, as in the paper's Figure 6, for one sequence of 512 tokens.
QLORA_PAPER = Finetuning("qlora", lora_rank=64, frozen_linear_bits=QLORA_BITS)
QLORA_PAPER_BATCH, QLORA_PAPER_SEQ = 1, 512
GPU_BYTES = 48 * 2**30  # a 48 GB card (RTX A6000, A40): 48 GiB


@dataclass
class QLoRAFit:
    """One QLoRA training step of ``shape``, term by term (bytes), from ``step_memory_formula``."""
    shape: str
    lora_rank: int
    batch: int
    seq: int
    linear_weights: int      # the blocks' frozen Linear weights, stored in 4 bits
    other_weights: int       # embeddings, head, norms: frozen, at the precision's width (bf16)
    adapter_params: int      # LoRA's A and B
    codes: float             # linear_weights · 4 bits
    statistics: float        # linear_weights · (QLORA_BITS − 4) bits: the double-quantized absmax
    other: float             # other_weights · 2 bytes
    adapter_weights: float   # adapter_params · 2 bytes (bf16)
    adapter_gradients: float  # adapter_params · 2 bytes (bf16)
    adapter_optimizer: float  # adapter_params · (4 float32 master + 8 AdamW m, v) bytes
    activations: float       # checkpointed block inputs, one recomputed block, buffers at the peak
    total: float
    full_total: float        # full fine-tuning in the same setting, for scale

    @property
    def fits(self) -> bool:
        return self.total < GPU_BYTES


def qlora_fit(shape: ModelShape = LLAMA_65B, method: Finetuning = QLORA_PAPER, batch: int = QLORA_PAPER_BATCH,
              seq: int = QLORA_PAPER_SEQ) -> QLoRAFit:
    """The QLoRA headline, its terms split out of ``step_memory_formula`` (mixed precision,
    gradient checkpointing) so that each can be checked by hand."""
    precision = MIXED_BF16
    m = step_memory_formula(shape, method, precision, batch, seq, gradient_checkpointing=True)
    linear = shape.linear_parameters()
    adapter = shape.lora_parameters(method.lora_rank, method.lora_targets)
    other = shape.num_parameters() - linear
    full = step_memory_formula(shape, FULL, precision, batch, seq, gradient_checkpointing=True)
    return QLoRAFit(shape.name, method.lora_rank, batch, seq, linear, other, adapter,
                    codes=linear * 4 / 8, statistics=linear * (method.frozen_linear_bits - 4) / 8,
                    other=other * precision.weight_bytes, adapter_weights=adapter * precision.weight_bytes,
                    adapter_gradients=m.gradients, adapter_optimizer=m.optimizer_state,
                    activations=m.activations + m.backward_buffers, total=m.total, full_total=full.total)
