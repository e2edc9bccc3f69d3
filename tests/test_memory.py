"""Floor 6: memory accounting (``lora_numpy.memory``).

``measure_step`` runs one training step and reports bytes by category; here each category is
recounted from the arrays the model and the optimizer actually hold, the LoRA figures are checked
against 4 bytes per trainable float (gradient) and 8 (AdamW's m and v), the measured peak of a
LoRA step is compared with full fine-tuning's, and the measured activations with the formula of
``analytic_step_memory``."""
import numpy as np
import pytest

from lora_numpy.memory import analytic_step_memory, measure_step
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


def test_full_activations_agree_with_the_formula(measured):
    model, _, mem = measured["full"]
    n = model.num_parameters()
    analytic = analytic_step_memory(GPTConfig(**SMALL), BATCH, SEQ, n, n)
    assert analytic["params"] == 4 * n and analytic["gradients"] == 4 * n
    assert analytic["optimizer_state"] == 8 * n
    rel = abs(mem.activations - analytic["activations"]) / analytic["activations"]
    assert rel < 0.03, (mem.activations, analytic["activations"])


def test_lora_activations_close_to_the_formula(measured):
    """The formula counts every op; with frozen embeddings the first ops keep no graph, so the
    measured figure may only come out a little lower."""
    model, _, mem = measured["lora"]
    ranks = [layer.r for _, layer in model.lora_layers()]
    assert ranks == [LORA["r"]] * 8
    analytic = analytic_step_memory(GPTConfig(**SMALL), BATCH, SEQ, model.num_parameters(),
                                    model.num_parameters(trainable_only=True), ranks)
    assert analytic["gradients"] == mem.gradients and analytic["optimizer_state"] == mem.optimizer_state
    rel = (analytic["activations"] - mem.activations) / analytic["activations"]
    assert -0.01 < rel < 0.05, (mem.activations, analytic["activations"])


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
        a = analytic_step_memory(config, batch, 16, model.num_parameters(), model.num_parameters())
        assert abs(figures[-1] - a["activations"]) / a["activations"] < 0.03
    assert 1.9 < figures[1] / figures[0] < 2.05
