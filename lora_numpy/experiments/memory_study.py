"""Floor 8: ``python -m lora_numpy compare --study memory``. Peak step memory measured at the
benchmark sizes, checked against the formula, then projected with it to GPT-2 124M, LLaMA-2 7B /
70B and LLaMA 65B (with QLoRA rows), and the QLoRA paper's headline (65B fine-tuning in 48 GB)
term by term."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..io import save_json
from ..memory import (FULL, FLOAT32, GPU_BYTES, LORA, PROJECTED_RUNS, PROJECTED_SHAPES, PROJECTION_BATCH,
                      PROJECTION_SEQ, MemoryBreakdown, ModelShape, QLoRAFit, measure_step, qlora_fit,
                      step_memory_formula)
from ..models import GPT, GPTConfig
from ..optim import AdamW
from ..peft import LoraConfig, get_peft_model
from ..recipes import BENCHMARK_SIZES
from ..train import default_loss


@dataclass
class MeasuredMemory:
    size: str
    method: str
    params: int
    measured_peak: int
    formula: MemoryBreakdown

    @property
    def error(self) -> float:
        """(formula - measured) / measured."""
        return self.formula.total / self.measured_peak - 1


@dataclass
class ProjectedMemory:
    shape: str
    method: str
    precision: str
    params: int
    trainable: int
    memory: MemoryBreakdown


@dataclass
class MemoryStudy:
    measured: list
    projected: list
    headline: QLoRAFit
    batch: int = PROJECTION_BATCH
    seq: int = PROJECTION_SEQ
    split_shape: str = "LLaMA-2 7B"
    plot: str = ""


def measure_benchmark_size(name: str, kind) -> MeasuredMemory:
    """One training step of the benchmark size ``name``, full or LoRA (all-linear, r=8), measured."""
    size = BENCHMARK_SIZES[name]
    config = GPTConfig(vocab_size=size.vocab, block_size=size.context, n_layer=size.model.n_layer,
                       n_head=size.model.n_head, n_embd=size.model.n_embd)
    model = GPT(config, seed=0)
    if kind.lora_rank is not None:
        model = get_peft_model(model, LoraConfig(r=kind.lora_rank, lora_alpha=2 * kind.lora_rank,
                                                 target_modules=kind.lora_targets))
    optimizer = AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-9)
    rng = np.random.default_rng(0)
    batch = tuple(rng.integers(0, size.vocab, (size.batch, size.context)) for _ in range(2))
    measure_step(model, batch, default_loss, optimizer)  # warm-up: creates the optimizer state
    peak = measure_step(model, batch, default_loss, optimizer).measured_peak
    formula = step_memory_formula(ModelShape.from_gpt_config(config, name), kind, FLOAT32, size.batch, size.context)
    return MeasuredMemory(name, kind.name, model.num_parameters(), peak, formula)


def project(shapes=PROJECTED_SHAPES, runs=PROJECTED_RUNS, batch: int = PROJECTION_BATCH,
            seq: int = PROJECTION_SEQ) -> list:
    rows = []
    for shape in shapes:
        for kind, precision in runs:
            trainable = (shape.num_parameters() if kind.lora_rank is None
                         else shape.lora_parameters(kind.lora_rank, kind.lora_targets))
            rows.append(ProjectedMemory(shape.name, kind.name, precision.name, shape.num_parameters(),
                                        trainable, step_memory_formula(shape, kind, precision, batch, seq)))
    return rows


def memory_study(out, progress: bool = True, sizes=tuple(BENCHMARK_SIZES)) -> MemoryStudy:
    from ..plots import save_memory_study

    measured = []
    for name in sizes:
        for kind in (FULL, LORA):
            measured.append(measure_benchmark_size(name, kind))
            if progress:
                m = measured[-1]
                print(f"measured {name:>6} {kind.name:>4}: peak {m.measured_peak / 2**20:8.2f} MiB, "
                      f"formula {m.formula.total / 2**20:8.2f} MiB ({m.error:+.1%})")
    study = MemoryStudy(measured, project(), qlora_fit())
    study.plot = str(save_memory_study(study, out))
    save_json(Path(out) / "memory.json", {
        "measured": [{**asdict(m), "error": m.error} for m in measured],
        "projected": [asdict(p) for p in study.projected],
        "qlora_headline": {**asdict(study.headline), "fits_48GB": study.headline.fits},
        "projection_tokens": {"batch": study.batch, "seq": study.seq}})
    return study


def format_memory(study: MemoryStudy) -> str:
    gib = lambda b: f"{b / 2**30:9.2f}"
    lines = [f"projected peak of one training step, batch {study.batch} x {study.seq} tokens, GiB "
             "(LoRA, QLoRA: r=8 on every Linear of the blocks; QLoRA: those Linears' weights in 4-bit NF4 "
             "with double quantization; optimizer: AdamW m and v, plus the float32 "
             "master weights in mixed precision; activ.: activations and backward buffers)",
             f"{'model':<12} {'params':>14} {'precision':<10} {'method':<6} {'trainable':>14} "
             f"{'weights':>9} {'grads':>9} {'optimizer':>9} {'activ.':>9} {'total':>9}"]
    for p in study.projected:
        m = p.memory
        lines.append(f"{p.shape:<12} {p.params:>14,} {p.precision.split(' ')[0]:<10} {p.method:<6} "
                     f"{p.trainable:>14,} {gib(m.weights)} {gib(m.gradients)} {gib(m.optimizer_state)} "
                     f"{gib(m.activations + m.backward_buffers)} {gib(m.total)}")
    return "\n".join(lines + ["", *format_qlora_fit(study.headline)])


def format_qlora_fit(f: QLoRAFit) -> list:
    """The QLoRA paper's headline, each term with its count and width."""
    gib = lambda b: f"{b / 2**30:7.2f} GiB"
    stat_bits = 8 * f.statistics / f.linear_weights
    terms = [("4-bit NF4 codes", f.linear_weights, "Linear weights x 4 bits", f.codes),
             ("statistics (double q.)", f.linear_weights, f"Linear weights x {stat_bits:.3f} bits", f.statistics),
             ("other weights, bf16", f.other_weights, "embeddings, head, norms x 2 B", f.other),
             ("LoRA weights, bf16", f.adapter_params, "x 2 B", f.adapter_weights),
             ("LoRA gradients, bf16", f.adapter_params, "x 2 B", f.adapter_gradients),
             ("LoRA master + AdamW", f.adapter_params, "x (4 + 8) B", f.adapter_optimizer)]
    lines = [f"the QLoRA paper's headline from the same formula: {f.shape}, LoRA r={f.lora_rank} on every "
             f"Linear of the blocks, batch {f.batch} x {f.seq} tokens, gradient checkpointing, bf16 mixed precision"]
    lines += [f"  {name:<23}{count:>15,} {width:<31}{gib(value)}" for name, count, width, value in terms]
    lines += [f"  {'activations':<23}{'block inputs, one block recomputed':>47}{gib(f.activations)}",
              f"  {'total':<70}{gib(f.total)} = {f.total / 1e9:.1f} GB: "
              f"{'fits' if f.fits else 'does not fit'} in one 48 GB GPU ({GPU_BYTES / 2**30:.0f} GiB)",
              f"  {'full fine-tuning, same setting':<70}{gib(f.full_total)}"]
    return lines
