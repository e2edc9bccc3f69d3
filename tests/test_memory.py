"""Floor 6: memory accounting (``lora_numpy.memory``).

``measure_step`` runs one training step and reports bytes by category; here each category is
recounted from the arrays the model and the optimizer actually hold, the LoRA figures are checked
against 4 bytes per trainable float (gradient) and 8 (AdamW's m and v), the measured peak of a
LoRA step is compared with full fine-tuning's, the measured activations and peak with the formula of
``step_memory_formula``, and its projection to LLaMA-2 7B with the same formula written out here."""
import numpy as np
import pytest

from lora_numpy.experiments.memory_study import measure_benchmark_size
from lora_numpy.memory import LORA as LORA_R8
from lora_numpy.memory import (FLOAT32, FULL, LLAMA2_7B, MIXED_BF16, Finetuning, ModelShape,
                               measure_step, step_memory_formula)
from lora_numpy.models import GPT, GPTConfig
from lora_numpy.nn import quantize_linears
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
    if method == "qlora":
        quantize_linears(model)
    if method in ("lora", "qlora"):
        model = get_peft_model(model, LoraConfig(**LORA))
    optimizer = AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-9)
    rng = np.random.default_rng(0)
    batch = (rng.integers(0, config.vocab_size, (BATCH, SEQ)), rng.integers(0, config.vocab_size, (BATCH, SEQ)))
    measure_step(model, batch, default_loss, optimizer)  # warm-up: creates the optimizer state
    return model, optimizer, measure_step(model, batch, default_loss, optimizer)


@pytest.fixture(scope="module")
def measured():
    return {method: _measure(method) for method in ("full", "lora", "qlora")}


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
    # per block 12·N·C: 2 LayerNorms 4, q k v 3, attention output 1 (its heads merge as a view),
    # out_proj output and residual 2, fc2 (down_proj) output and residual 2
    act_floats = L * (12 * N * C + 4 * N * F + B * H * T * T) + 4 * N * C + T * C + 2 * N * V
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


def test_qlora_65b_fits_in_48gb_written_out_by_hand():
    """The QLoRA paper's headline, term by term: LLaMA 65B, NF4 + double quantization on every
    Linear of the blocks, LoRA r=64 there (bf16 weights and gradients, float32 master weights and
    AdamW m, v), one sequence of 512 tokens, gradient checkpointing."""
    from lora_numpy.memory import GPU_BYTES, LLAMA_65B, qlora_fit
    L, C, F, V, H, r = 80, 8192, 22016, 32000, 64, 64
    linear = L * (4 * C * C + 3 * C * F)                       # q, k, v, o; gate, up, down
    n = linear + L * 2 * C + 2 * V * C + C                       # + RMSNorm weights, embeddings, head
    adapter = L * r * (4 * (C + C) + 2 * (C + F) + (F + C))     # r(d_in + d_out) per Linear
    bits = 4 + 8 / 64 + 32 / (64 * 256)                          # NF4 code + double-quantized absmax
    B, T = 1, 512
    N = B * T
    codes, statistics = linear * 4 / 8, linear * (bits - 4) / 8
    other = (n - linear) * 2
    one_block = 12 * N * C + 4 * N * F + B * H * T * T + 7 * N * r
    act_floats = L * N * C + one_block + 4 * N * C + T * C + 2 * N * V   # checkpointed block inputs
    activations = act_floats * 2 + 8 * N + 2 * N * F * 2 + F * C * 2    # + buffers, one dequantized W
    total = codes + statistics + other + adapter * (2 + 2 + 4 + 8) + activations

    fit = qlora_fit()
    assert LLAMA_65B.num_parameters() == n == 65_285_660_672      # LLaMA 65B's published count
    assert (fit.linear_weights, fit.other_weights, fit.adapter_params) == (linear, n - linear, adapter)
    assert fit.codes == codes and fit.statistics == pytest.approx(statistics)
    assert fit.adapter_weights == 2 * adapter and fit.adapter_gradients == 2 * adapter
    assert fit.adapter_optimizer == 12 * adapter
    assert fit.activations == pytest.approx(activations)
    assert fit.total == pytest.approx(total)
    parts = (fit.codes + fit.statistics + fit.other + fit.adapter_weights + fit.adapter_gradients
             + fit.adapter_optimizer + fit.activations)
    assert parts == pytest.approx(fit.total)
    assert total < GPU_BYTES == 48 * 2**30 and fit.fits           # the headline: it fits
    assert fit.full_total > 780e9                                  # the paper's "> 780 GB" for 16-bit full


def test_gradient_checkpointing_keeps_block_inputs_and_one_block():
    L, C, F, V, H = 32, 4096, 11008, 32000, 32
    B, T = 2, 64
    N = B * T
    block = 12 * N * C + 4 * N * F + B * H * T * T
    outside = 4 * N * C + T * C + 2 * N * V
    assert LLAMA2_7B.activation_floats(B, T) == L * block + outside
    assert LLAMA2_7B.activation_floats(B, T, gradient_checkpointing=True) == L * N * C + block + outside


def test_projection_has_qlora_rows_in_mixed_precision():
    from lora_numpy.experiments.memory_study import project
    from lora_numpy.memory import PROJECTED_SHAPES, QLORA, QLORA_BITS
    rows = project()
    qlora = [r for r in rows if r.method == "qlora"]
    assert QLORA.frozen_linear_bits == QLORA_BITS == pytest.approx(4.127, abs=1e-3)
    assert {r.shape for r in qlora} == {r.shape for r in rows} and all(r.precision.startswith("mixed") for r in qlora)
    shapes = {s.name: s for s in PROJECTED_SHAPES}
    for q in qlora:
        lora = next(r for r in rows if r.shape == q.shape and r.method == "lora" and r.precision == q.precision)
        assert q.trainable == lora.trainable and q.memory.gradients == lora.memory.gradients
        saved = shapes[q.shape].linear_parameters() * (2 - QLORA_BITS / 8)   # bf16 -> 4.127 bits
        assert lora.memory.weights - q.memory.weights == pytest.approx(saved)
    big = {r.method: r.memory.total for r in rows if r.shape == "LLaMA 65B" and r.precision.startswith("mixed")}
    assert big["qlora"] < 0.5 * big["lora"] < 0.1 * big["full"]


def test_a_4bit_base_is_counted_as_frozen_and_matches_the_formula():
    """measure_step counts a Linear4bit's codes and statistics with the frozen base (they are not
    Parameters), and those bytes agree with the formula's 4.127 bits per Linear weight."""
    from lora_numpy.memory import QLORA
    from lora_numpy.nn import Linear4bit, frozen_nbytes, quantize_linears
    config = GPTConfig(**SMALL)
    model = get_peft_model(quantize_linears(GPT(config, seed=0)), LoraConfig(r=8, target_modules="all-linear"))
    assert any(isinstance(m, Linear4bit) for _, m in model.named_modules())
    optimizer = AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-9)
    rng = np.random.default_rng(0)
    batch = (rng.integers(0, config.vocab_size, (2, SEQ)), rng.integers(0, config.vocab_size, (2, SEQ)))
    measure_step(model, batch, default_loss, optimizer)
    mem = measure_step(model, batch, default_loss, optimizer)
    assert mem.params_frozen == frozen_nbytes(model)
    assert mem.params_frozen < 0.25 * 4 * _n_base_params(config)
    formula = step_memory_formula(ModelShape.from_gpt_config(config), QLORA, FLOAT32, 2, SEQ)
    assert formula.weights == pytest.approx(mem.params_frozen + mem.params_trainable, rel=1e-3)


def test_qlora_keeps_the_activations_of_lora_and_a_smaller_peak(measured):
    """The 4-bit base is decoded for each product and dropped (the fused op gets the decoder, not
    a float W0), so a QLoRA step keeps exactly LoRA's activations and its peak sits below."""
    _, _, lora = measured["lora"]
    _, _, qlora = measured["qlora"]
    assert qlora.activations == lora.activations
    assert qlora.params_frozen < lora.params_frozen / 4
    assert qlora.measured_peak < lora.measured_peak


def _closure_arrays(node):
    """Every array a node's backward closure holds (a Tensor through its .data): what memory.py
    read before ops declared what they save; here the check that the declarations are whole."""
    for cell in node._backward.__closure__ or ():
        value = cell.cell_contents
        for item in value if isinstance(value, (tuple, list)) else (value,):
            item = item.data if hasattr(item, "requires_grad") else item
            if hasattr(item, "nbytes") and item.shape != ():
                yield item


@pytest.mark.parametrize("method", ["full, dropout", "lora, dropout", "dora", "qlora", "embedding lora"])
def test_every_op_declares_each_array_its_backward_keeps(method):
    from lora_numpy.autograd import topological_order
    from lora_numpy.memory import _buffer
    config = GPTConfig(**{**SMALL, "n_layer": 2, "dropout": 0.1 if "dropout" in method else 0.0})
    model = GPT(config, seed=0)
    if method == "qlora":
        quantize_linears(model)
    if method != "full, dropout":
        targets = ("wte",) if method == "embedding lora" else "all-linear"
        model = get_peft_model(model, LoraConfig(r=4, target_modules=targets, use_dora=method == "dora",
                                                 lora_dropout=0.1 if "dropout" in method else 0.0))
    model.train()
    rng = np.random.default_rng(0)
    loss = default_loss(model, (rng.integers(0, 96, (2, 16)), rng.integers(0, 96, (2, 16))))
    stored = {id(_buffer(p.data)) for p in model.parameters()}
    for node in topological_order(loss):
        if node._backward is None:
            continue
        declared = {id(_buffer(a)) for a in (node.data, *(p.data for p in node._prev), *node._saved)}
        undeclared = [a.shape for a in _closure_arrays(node)
                      if id(_buffer(a)) not in declared | stored]
        assert not undeclared, f"op '{node._op}' keeps arrays of shapes {undeclared} it did not declare"
