"""Floor 5: the GPT and its classification head: module names and parameter count, causality,
a whole-model gradient check, overfitting one batch, GPT-2 init, generation and determinism."""
import math

import numpy as np
import pytest

from lora_numpy import backend
from lora_numpy.gradcheck import gradcheck
from lora_numpy.models import GPT, GPTConfig, GPTForSequenceClassification
from lora_numpy.nn import Dropout, Embedding, LayerNorm, Linear, ModuleList
from lora_numpy.train import TrainConfig, train

TINY = dict(vocab_size=15, block_size=16, n_layer=2, n_head=2, n_embd=16)


def tiny(**overrides):
    return GPTConfig(**{**TINY, **overrides})


def _np(a):
    return backend.to_numpy(a)


def ids(rng, b, t, vocab=TINY["vocab_size"]):
    return rng.integers(0, vocab, size=(b, t))


# ---- structure ---------------------------------------------------------------------------------
def test_module_paths_follow_the_design():
    """Every module path of DESIGN §2 exists with the right layer type, and the parameter
    names are exactly those paths plus ``.weight``/``.bias`` (lm_head has no bias)."""
    config = tiny(n_layer=3)
    model = GPT(config)
    modules = dict(model.named_modules())
    expected = {"wte": Embedding, "wpe": Embedding, "blocks": ModuleList, "ln_f": LayerNorm,
                "lm_head": Linear}
    for i in range(config.n_layer):
        expected.update({f"blocks.{i}.ln_1": LayerNorm, f"blocks.{i}.ln_2": LayerNorm,
                         f"blocks.{i}.mlp.fc1": Linear, f"blocks.{i}.mlp.fc2": Linear})
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            expected[f"blocks.{i}.attn.{proj}"] = Linear
    for path, kind in expected.items():
        assert isinstance(modules.get(path), kind), path
        assert model.get_submodule(path) is modules[path]
    assert f"blocks.{config.n_layer}" not in modules

    with_bias = [p for p, k in expected.items() if k in (Linear, LayerNorm) and p != "lm_head"]
    names = {f"{p}.weight" for p, k in expected.items() if k is not ModuleList}
    names |= {f"{p}.bias" for p in with_bias}
    assert set(n for n, _ in model.named_parameters()) == names
    d, v = config.n_embd, config.vocab_size
    assert model.get_submodule("blocks.0.mlp.fc1").weight.shape == (4 * d, d)
    assert model.get_submodule("blocks.0.mlp.fc2").weight.shape == (d, 4 * d)
    assert model.lm_head.weight.shape == (v, d)
    assert model.wpe.weight.shape == (config.block_size, d)


@pytest.mark.parametrize("overrides", [{}, dict(n_layer=3, n_embd=24, n_head=4, vocab_size=21)])
def test_parameter_count_formula(overrides):
    """num_parameters() equals the count written from the config (bias=True)."""
    c = tiny(**overrides)
    d, v, t, layers = c.n_embd, c.vocab_size, c.block_size, c.n_layer
    attn = 4 * d * d + 4 * d
    mlp = (d * 4 * d + 4 * d) + (4 * d * d + d)  # = 8d² + 5d
    lns = 2 * (2 * d)
    expected = v * d + t * d + layers * (attn + mlp + lns) + 2 * d + v * d
    assert mlp == 8 * d * d + 5 * d
    assert GPT(c).num_parameters() == expected


def test_logits_shape_and_dtype_float32():
    """forward gives (B, T, V) float32 logits and a float32 scalar loss; grads stay float32."""
    rng = np.random.default_rng(0)
    model = GPT(tiny())
    x, y = ids(rng, 3, 10), ids(rng, 3, 10)
    logits, loss = model(x, y)
    assert logits.shape == (3, 10, 15) and logits.dtype == np.float32
    assert loss.shape == () and loss.dtype == np.float32
    assert model(x)[1] is None
    loss.backward()
    assert all(p.grad.dtype == np.float32 for p in model.parameters())


# ---- causality ---------------------------------------------------------------------------------
def test_causal_mask_future_tokens_do_not_change_the_past():
    """Changing the token at position j leaves the logits at positions < j bit-identical and
    changes those at positions >= j."""
    rng = np.random.default_rng(0)
    model = GPT(tiny(), seed=1)
    x = ids(rng, 2, 12)
    j = 7
    x2 = x.copy()
    x2[:, j] = (x[:, j] + 1) % 15
    a, b = _np(model(x)[0].data), _np(model(x2)[0].data)
    np.testing.assert_array_equal(a[:, :j], b[:, :j])
    for pos in range(j, 12):
        assert np.abs(a[:, pos] - b[:, pos]).max() > 1e-6, pos


def test_sequence_longer_than_block_size_is_a_clear_error():
    """More than block_size tokens raises a ValueError naming block_size; exactly block_size
    is fine."""
    model = GPT(tiny())
    model(np.zeros((1, 16), dtype=np.int64))
    with pytest.raises(ValueError, match="block_size"):
        model(np.zeros((1, 17), dtype=np.int64))


# ---- gradients and learning ------------------------------------------------------------------
def test_whole_gpt_gradcheck():
    """The analytic gradient of the loss w.r.t. every parameter tensor of a tiny GPT matches
    finite differences (float64, 20 sampled elements per tensor); a -100 target is ignored."""
    rng = np.random.default_rng(0)
    model = GPT(tiny(n_embd=8, block_size=6), seed=3).to("float64")
    # At GPT-2's init (std 0.02) attention is almost uniform and the q/k gradients are ~1e-5,
    # too close to the tolerance to catch an error; larger random values make every gradient
    # sizeable (LayerNorm gains and biases included).
    for name, p in model.named_parameters():
        p.data[...] = p.data + backend.asarray(0.4 * rng.standard_normal(p.shape))
    x, y = ids(rng, 2, 6), ids(rng, 2, 6)
    y[0, :2] = -100
    params = model.parameters()
    assert len(params) == 2 + 2 * 16 + 2 + 1
    assert gradcheck(lambda *ps: model(x, y)[1], params, max_elements=20, atol=1e-8)


def test_overfits_one_batch():
    """Training on one fixed batch drives its loss from about ln(V) to near zero: forward,
    backward and the optimizer work together."""
    rng = np.random.default_rng(0)
    x, y = ids(rng, 4, 16), ids(rng, 4, 16)
    model = GPT(tiny(), seed=0)
    history = train(model, lambda r: (x, y),
                    TrainConfig(steps=300, batch_size=4, lr=1e-2, warmup_steps=10, weight_decay=0.0),
                    progress=False)
    assert history[0]["loss"] > 0.8 * math.log(15)
    assert history[-1]["loss"] < 0.05
    assert model(x, y)[1].item() < 0.05


# ---- init --------------------------------------------------------------------------------------
def test_gpt2_init():
    """Weights ~N(0, 0.02), residual projections (out_proj, fc2) ~N(0, 0.02/sqrt(2·n_layer)),
    Linear biases 0, LayerNorms 1 and 0."""
    config = GPTConfig(vocab_size=64, block_size=32, n_layer=3, n_head=4, n_embd=128)
    model = GPT(config, seed=0)
    residual = 0.02 / math.sqrt(2 * config.n_layer)
    checked = set()
    for name, p in model.named_parameters():
        a = _np(p.data)
        if ".ln_" in name or name.startswith("ln_f"):
            np.testing.assert_array_equal(a, np.ones_like(a) if name.endswith("weight") else 0)
        elif name.endswith("bias"):
            np.testing.assert_array_equal(a, 0)
        else:
            std = residual if name.endswith(("attn.out_proj.weight", "mlp.fc2.weight")) else 0.02
            assert abs(a.std() / std - 1) < 0.07, (name, a.std(), std)
            assert abs(a.mean()) < 0.1 * std, name
            checked.add(name.rsplit(".", 2)[-2])
    assert {"wte", "wpe", "q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2",
            "lm_head"} <= checked


# ---- generation ------------------------------------------------------------------------------
def test_generate_greedy_is_repeated_argmax():
    """temperature=0 is deterministic and equals appending argmax of forward's last logits."""
    rng = np.random.default_rng(0)
    model = GPT(tiny(), seed=2)
    prompt = ids(rng, 2, 3)
    out = _np(model.generate(prompt, 6, temperature=0))
    assert out.shape == (2, 9)
    np.testing.assert_array_equal(out[:, :3], prompt)
    np.testing.assert_array_equal(out, _np(model.generate(prompt, 6, temperature=0)))
    seq = prompt.copy()
    for _ in range(6):
        nxt = _np(model(seq)[0].data)[:, -1].argmax(-1)
        seq = np.concatenate([seq, nxt[:, None]], axis=1)
    np.testing.assert_array_equal(out, seq)


def test_generate_sampling_is_reproducible_and_top_k_1_is_greedy():
    """The same seeded rng samples the same tokens twice; top_k=1 at any temperature is greedy;
    sampling without an rng is refused."""
    rng = np.random.default_rng(0)
    model = GPT(tiny(), seed=2)
    prompt = ids(rng, 3, 2)
    a = _np(model.generate(prompt, 10, temperature=1.5, rng=np.random.default_rng(5)))
    b = _np(model.generate(prompt, 10, temperature=1.5, rng=np.random.default_rng(5)))
    np.testing.assert_array_equal(a, b)
    assert a.min() >= 0 and a.max() < 15
    c = _np(model.generate(prompt, 10, temperature=1.5, rng=np.random.default_rng(6)))
    assert not np.array_equal(a, c)
    greedy = _np(model.generate(prompt, 10, temperature=0))
    top1 = _np(model.generate(prompt, 10, temperature=2.0, top_k=1, rng=np.random.default_rng(5)))
    np.testing.assert_array_equal(top1, greedy)
    with pytest.raises(ValueError):
        model.generate(prompt, 1, temperature=1.0)


def test_generate_crops_context_to_block_size():
    """A prompt near block_size can be extended past it: each new token is the argmax of the
    forward pass on the last block_size tokens; training mode is restored afterwards."""
    rng = np.random.default_rng(0)
    model = GPT(tiny(), seed=4)
    model.train()
    prompt = ids(rng, 2, 14)
    out = _np(model.generate(prompt, 5, temperature=0))
    assert out.shape == (2, 19)
    assert model.training
    for t in range(14, 19):
        window = out[:, max(0, t - 16):t]
        np.testing.assert_array_equal(out[:, t], _np(model(window)[0].data)[:, -1].argmax(-1))


# ---- sequence classification ---------------------------------------------------------------------
def test_classifier_shape_and_padding_invariance():
    """Logits are (B, num_labels), read at the last real token: pad contents after it do not
    change them, and lengths=None reads the last position."""
    rng = np.random.default_rng(0)
    model = GPTForSequenceClassification(tiny(), num_labels=3, seed=1)
    x = ids(rng, 4, 10)
    lengths = np.array([10, 4, 7, 1])
    logits = _np(model(x, lengths)[0].data)
    assert logits.shape == (4, 3)
    x2 = x.copy()
    for i, n in enumerate(lengths):
        x2[i, n:] = rng.integers(0, 15, size=10 - n)
    assert not np.array_equal(x, x2)
    np.testing.assert_allclose(_np(model(x2, lengths)[0].data), logits, rtol=1e-5, atol=1e-6)
    # each row equals the logits of the unpadded row on its own
    for i, n in enumerate(lengths):
        alone = _np(model(x[i:i + 1, :n])[0].data)[0]
        np.testing.assert_allclose(logits[i], alone, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(_np(model(x)[0].data), _np(model(x, np.full(4, 10))[0].data))


def test_classifier_gradient_and_class_weighted_loss():
    """The loss sends a gradient to score.weight and the body, and the class-weighted loss is
    Σ w[y]·(-log p[y]) / Σ w[y]."""
    rng = np.random.default_rng(0)
    model = GPTForSequenceClassification(tiny(), num_labels=3, seed=1)
    x, lengths = ids(rng, 6, 8), np.array([8, 3, 5, 8, 2, 6])
    labels = np.array([0, 2, 1, 1, 2, 0])
    weight = np.array([0.5, 2.0, 3.0], dtype=np.float32)
    logits, loss = model(x, lengths, labels, class_weight=weight)
    loss.backward()
    assert model.score.weight.grad is not None and np.abs(_np(model.score.weight.grad)).max() > 0
    assert np.abs(_np(model.transformer.wte.weight.grad)).max() > 0
    z = _np(logits.data).astype(np.float64)
    logp = z - z.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    w = weight[labels]
    expected = -(w * logp[np.arange(6), labels]).sum() / w.sum()
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    unweighted = model(x, lengths, labels)[1].item()
    assert unweighted == pytest.approx(-logp[np.arange(6), labels].mean(), rel=1e-5)
    assert unweighted != pytest.approx(expected, rel=1e-3)


# ---- determinism -----------------------------------------------------------------------------
def test_same_seed_same_parameters():
    """Two models built with one seed are bit-identical (classifier head included); another
    seed gives different weights."""
    for build in (lambda s: GPT(tiny(), seed=s),
                  lambda s: GPTForSequenceClassification(tiny(), num_labels=4, seed=s)):
        a, b, c = build(7).state_dict(), build(7).state_dict(), build(8).state_dict()
        assert list(a) == list(b)
        for k in a:
            np.testing.assert_array_equal(_np(a[k]), _np(b[k]))
        assert any(not np.array_equal(_np(a[k]), _np(c[k])) for k in a if _np(a[k]).std() > 0)


def _dropout_run(model_seed, data_seed=0, steps=8):
    config = tiny(dropout=0.2)
    model = GPT(config, seed=model_seed)
    assert any(isinstance(m, Dropout) and m.p == 0.2 for _, m in model.named_modules())

    def batch_fn(rng):
        return ids(rng, 4, 12), ids(rng, 4, 12)
    history = train(model, batch_fn, TrainConfig(steps=steps, batch_size=4, lr=1e-2, warmup_steps=2,
                                                 seed=data_seed), progress=False)
    return [r["loss"] for r in history], model


def test_training_is_deterministic_with_dropout():
    """Training twice with the same seeds (dropout 0.2) gives bit-identical losses and weights;
    a different model seed, or a different data seed, gives different losses."""
    losses_a, model_a = _dropout_run(0)
    losses_b, model_b = _dropout_run(0)
    assert losses_a == losses_b
    for k, v in model_a.state_dict().items():
        np.testing.assert_array_equal(_np(v), _np(model_b.state_dict()[k]))
    assert _dropout_run(1)[0] != losses_a
    assert _dropout_run(0, data_seed=1)[0] != losses_a


def test_dropout_masks_depend_on_the_model_seed():
    """With dropout the training-mode forward is random but seeded: same model seed, same
    output; eval mode is deterministic and differs from training mode."""
    rng = np.random.default_rng(0)
    x = ids(rng, 2, 8)
    a, b = GPT(tiny(dropout=0.3), seed=0), GPT(tiny(dropout=0.3), seed=0)
    np.testing.assert_array_equal(_np(a(x)[0].data), _np(b(x)[0].data))
    first = _np(a(x)[0].data)
    assert not np.array_equal(first, _np(a(x)[0].data))  # the generator moved on
    a.eval()
    e1 = _np(a(x)[0].data)
    np.testing.assert_array_equal(e1, _np(a(x)[0].data))
    assert not np.allclose(e1, first)
