"""Floor 6: memory accounting (``lora_numpy.memory``).

``measure_step`` runs one training step and reports bytes by category; here each category is
recounted from the arrays the model and the optimizer actually hold, the LoRA figures are checked
against 4 bytes per trainable float (gradient) and 8 (AdamW's m and v), the measured peak of a
LoRA step is compared with full fine-tuning's, the measured activations and peak with the formula of
``step_memory_formula``, and its projection to LLaMA-2 7B with the same formula written out here."""
import numpy as np
import pytest

from lora_numpy.experiments.studies import measure_benchmark_size
from lora_numpy.memory import LORA as LORA_R8
from lora_numpy.memory import (FLOAT32, FULL, LLAMA2_7B, MIXED_BF16, Finetuning, ModelShape,
                               measure_step, step_memory_formula)
from lora_numpy.models import GPT, GPTConfig
from lora_numpy.optim import AdamW
from lora_numpy.peft import LoraConfig, get_peft_model
from lora_numpy.train import default_loss

# "The small model" of the benchmarks; a batch of 8 x 64 tokens keeps the file fast on a CPU
# (the categories scale linearly with the batch, so nothing is lost by using fewer rows).
SMALL = dict(vocab_size=96, block_size=64, n_layer=4, n_head=4, n_embd=128)
BATCH, SEQ = 8, 64
LORA = dict(r=8, target_modules=("q_proj", "v_proj"))


def _measure(method):
    config = GPTConfig(**SMALL)
    model = GPT(config, seed=0)
    if method == "lora":
        model = get_peft_model(model, LoraConfig(**LORA))
    optimizer = AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-9)
    rng = np.random.default_rng(0)
    batch = (rng.integers(0, config.vocab_size, (BATCH, SEQ)), rng.integers(0, config.vocab_size, (BATCH, SEQ)))
    measure_step(model, batch, default_loss, optimizer)  # warm-up: creates the optimizer state
    return model, optimizer, measure_step(model, batch, default_loss, optimizer)


@pytest.fixture(scope="module")
def measured():
    return {method: _measure(method) for method in ("full", "lora")}


def _n_base_params(c):
    d, v, t = c.n_embd, c.vocab_size, c.block_size
    per_block = (4 * d * d + 4 * d) + (8 * d * d + 5 * d) + 4 * d
    return v * d + t * d + c.n_layer * per_block + 2 * d + v * d


@pytest.mark.parametrize("method", ["full", "lora"])
def test_categories_match_the_arrays_held(measured, method):
    model, optimizer, mem = measured[method]
    params = model.parameters()
    assert mem.params_trainable == sum(p.data.nbytes for p in params if p.requires_grad)
    assert mem.params_frozen == sum(p.data.nbytes for p in params if not p.requires_grad)
    assert mem.gradients == sum(p.grad.nbytes for p in params if p.grad is not None)
    state_arrays = [v for s in optimizer.state.values() for v in s.values() if hasattr(v, "nbytes")]
    assert len(state_arrays) == 2 * sum(1 for p in params if p.requires_grad)  # m and v each
    assert mem.optimizer_state == sum(v.nbytes for v in state_arrays)
    assert mem.counted_total == (mem.params_trainable + mem.params_frozen + mem.gradients
                                 + mem.optimizer_state + mem.activations)
    # everything alive at the end of the forward pass fits under the measured peak
    assert mem.measured_peak >= (mem.params_trainable + mem.params_frozen + mem.optimizer_state
                                 + mem.activations)


def test_full_fine_tuning_figures(measured):
    model, _, mem = measured["full"]
    n = _n_base_params(GPTConfig(**SMALL))
    assert model.num_parameters() == n
    assert mem.params_trainable == 4 * n and mem.params_frozen == 0
    assert mem.gradients == 4 * n
    assert mem.optimizer_state == 8 * n


def test_lora_figures(measured):
    model, _, mem = measured["lora"]
    c = GPTConfig(**SMALL)
    trainable = c.n_layer * 2 * LORA["r"] * (c.n_embd + c.n_embd)  # r(d_in + d_out) per layer
    assert model.num_parameters(trainable_only=True) == trainable
    assert mem.params_trainable == 4 * trainable
    assert mem.params_frozen == 4 * _n_base_params(c)
    assert mem.gradients == 4 * trainable
    assert mem.optimizer_state == 8 * trainable
    for _, p in model.named_parameters():
        assert (p.grad is None) == (not p.requires_grad)


def test_lora_step_peaks_below_full_fine_tuning(measured):
    full, lora = measured["full"][2], measured["lora"][2]
    assert lora.measured_peak < full.measured_peak
    # the saving is at least the gradients and optimizer state LoRA does not keep
    saved = (full.gradients + full.optimizer_state) - (lora.gradients + lora.optimizer_state)
    assert full.measured_peak - lora.measured_peak > 0.5 * saved


def _formula(model, kind):
    shape = ModelShape.from_gpt_config(GPTConfig(**SMALL))
    return step_memory_formula(shape, kind, FLOAT32, BATCH, SEQ)


def test_full_activations_agree_with_the_formula(measured):
    model, _, mem = measured["full"]
    n = model.num_parameters()
    formula = _formula(model, FULL)
    assert formula.weights == 4 * n and formula.gradients == 4 * n and formula.optimizer_state == 8 * n
    rel = abs(mem.activations - formula.activations) / formula.activations
    assert rel < 0.03, (mem.activations, formula.activations)


def test_lora_activations_close_to_the_formula(measured):
    """The formula counts every op; with frozen embeddings the first ops keep no graph, so the
    measured figure may only come out a little lower."""
    model, _, mem = measured["lora"]
    assert [layer.r["default"] for _, layer in model.lora_layers()] == [LORA["r"]] * 8
    formula = _formula(model, Finetuning("lora", LORA["r"], LORA["target_modules"]))
    assert formula.weights == mem.params_frozen + mem.params_trainable
    assert formula.gradients == mem.gradients and formula.optimizer_state == mem.optimizer_state
    rel = (formula.activations - mem.activations) / formula.activations
    assert -0.01 < rel < 0.05, (mem.activations, formula.activations)


@pytest.mark.parametrize("size", ["tiny", "small"])
@pytest.mark.parametrize("kind", [FULL, LORA_R8], ids=["full", "lora"])
def test_formula_predicts_the_measured_peak_within_5_percent(size, kind):
    """The peak of a whole step (tracemalloc), not just the categories, at two benchmark sizes."""
    row = measure_benchmark_size(size, kind)
    assert abs(row.error) < 0.05, (size, kind.name, row.measured_peak, row.formula.total)


def test_shapes_give_the_published_parameter_counts():
    assert ModelShape("GPT-2", 12, 768, 12, 50257, 1024, tied_embeddings=True).num_parameters() == 124_439_808
    assert LLAMA2_7B.num_parameters() == 6_738_415_616
    assert LLAMA2_7B.lora_parameters(8) == 19_988_480  # PEFT's count for r=8 on every Linear


def test_projected_7b_equals_the_formula_written_out():
    L, C, F, V, H = 32, 4096, 11008, 32000, 32
    n = L * (4 * C * C + 3 * C * F + 2 * C) + 2 * V * C + C         # no biases, RMSNorm weights only
    r = 8
    trainable = L * r * (4 * (C + C) + 2 * (C + F) + (F + C))        # q,k,v,o, gate, up, down
    B, T = 1, 1024
    N = B * T
    act_floats = L * (13 * N * C + 4 * N * F + B * H * T * T) + 4 * N * C + T * C + 2 * N * V
    lora_act_floats = act_floats + L * 7 * N * r
    buffers = 2 * N * F
    for precision, w, g, opt, a in ((FLOAT32, 4, 4, 8, 4), (MIXED_BF16, 2, 2, 4 + 8, 2)):
        full = step_memory_formula(LLAMA2_7B, FULL, precision, B, T)
        assert full.weights == n * w and full.gradients == n * g and full.optimizer_state == n * opt
        assert full.activations == act_floats * a + 8 * N and full.backward_buffers == buffers * a
        lora = step_memory_formula(LLAMA2_7B, LORA_R8, precision, B, T)
        assert lora.weights == (n + trainable) * w
        assert lora.gradients == trainable * g and lora.optimizer_state == trainable * opt
        assert lora.activations == lora_act_floats * a + 8 * N
    # mixed precision, full fine-tuning: the 16 bytes per parameter of the ZeRO paper, plus activations
    full = step_memory_formula(LLAMA2_7B, FULL, MIXED_BF16, B, T)
    assert full.weights + full.gradients + full.optimizer_state == 16 * n


def test_quantized_frozen_weights_enter_the_formula():
    """A QLoRA-style entry: the blocks' Linear weights at 4.127 bits, the rest as before."""
    qlora = Finetuning("qlora", 8, frozen_linear_bits=4.127)
    plain = step_memory_formula(LLAMA2_7B, LORA_R8, MIXED_BF16, 1, 1024)
    quant = step_memory_formula(LLAMA2_7B, qlora, MIXED_BF16, 1, 1024)
    linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert plain.weights - quant.weights == pytest.approx(linear * (2 - 4.127 / 8))
    assert quant.gradients == plain.gradients and quant.activations == plain.activations


def test_activations_scale_with_the_batch():
    """Twice the rows, about twice the activations (the position table is the only fixed part)."""
    config = GPTConfig(**{**SMALL, "n_layer": 1, "n_embd": 32, "vocab_size": 20})
    figures = []
    for batch in (2, 4):
        model = GPT(config, seed=0)
        optimizer = AdamW(model.parameters(), lr=1e-9)
        rng = np.random.default_rng(0)
        data = (rng.integers(0, 20, (batch, 16)), rng.integers(0, 20, (batch, 16)))
        figures.append(measure_step(model, data, default_loss, optimizer).activations)
        a = step_memory_formula(ModelShape.from_gpt_config(config), FULL, FLOAT32, batch, 16).activations
        assert abs(figures[-1] - a) / a < 0.03
    assert 1.9 < figures[1] / figures[0] < 2.05
