"""Floor 6: LoRA and PiSSA with PEFT's API (``lora_numpy.peft``).

Config validation, target matching, the init distributions and scaling, the trainable-parameter
count and PEFT's printout, freezing and biases, the forward formula and a gradient check of the
fused ``lora_linear``, merge/unmerge/disable, what training may and may not touch, PiSSA's
SVD properties and its conversion to plain LoRA, adapter files, and rank reduction.
Every expected value is computed here from the formulas of DESIGN §3 with NumPy."""
import copy
import json
import math

import numpy as np
import pytest
from safetensors.numpy import load_file

from lora_numpy import Tensor, backend, no_grad
from lora_numpy import functional as F
from lora_numpy.checkpoint import snapshot
from lora_numpy.gradcheck import gradcheck
from lora_numpy.models import GPT, GPTConfig, GPTForSequenceClassification
from lora_numpy.nn import LayerNorm, Linear
from lora_numpy.optim import AdamW, param_groups_for_weight_decay
from lora_numpy.peft import LoraConfig, LoraLinear, PeftModel, find_targets, get_peft_model
from lora_numpy.train import TrainConfig, train

TINY = dict(vocab_size=15, block_size=16, n_layer=2, n_head=2, n_embd=16)
F32 = dict(rtol=1e-4, atol=1e-5)  # float32 model outputs of order 1


def tiny(**overrides):
    return GPTConfig(**{**TINY, **overrides})


def _np(a):
    return backend.to_numpy(a)


def _randomize(model, seed):
    """Weights of order 1 (GPT-2's N(0, 0.02) makes every logit ~0, which hides errors)."""
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():
        values = rng.normal(0.0, 0.3, size=p.shape)
        if ".ln_" in name or name.startswith("ln_f"):
            values = (1.0 if name.endswith("weight") else 0.0) + 0.3 * values
        p.data[...] = backend.asarray(values.astype(p.dtype))
    return model


def base_gpt(seed=0, **overrides):
    """A tiny GPT with order-1 weights; the same seed gives an identical model."""
    return _randomize(GPT(tiny(**overrides), seed), seed + 1000)


def base_classifier(seed=0, num_labels=3, **overrides):
    return _randomize(GPTForSequenceClassification(tiny(**overrides), num_labels, seed), seed + 2000)


def ids(rng, b=3, t=9):
    return rng.integers(0, TINY["vocab_size"], size=(b, t))


def logits(model, x):
    model.eval()
    with no_grad():
        out = _np(model(x)[0].data).copy()
    model.train()
    return out


def linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, Linear)]


def lora_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, LoraLinear)]


def lm_batch(rng):
    seq = rng.integers(0, TINY["vocab_size"], size=(4, 10))
    return seq[:, :-1], seq[:, 1:]


def quick_train(model, steps=3, lr=1e-2, batch_fn=lm_batch, weight_decay=0.1):
    return train(model, batch_fn, TrainConfig(steps=steps, batch_size=4, lr=lr, warmup_steps=0,
                                              weight_decay=weight_decay, eval_every=0),
                 progress=False)


def randomize_adapters(model, seed=5, scale=0.3):
    """Give every adapter nonzero A and B, so ΔW ≠ 0."""
    rng = np.random.default_rng(seed)
    for _, layer in model.lora_layers():
        for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
            p.data[...] = backend.asarray(rng.normal(0.0, scale, p.shape).astype(p.dtype))


def svd_truncation(M, k):
    U, S, Vt = np.linalg.svd(M, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vt[:k]


# ==== LoraConfig validation ======================================================================
@pytest.mark.parametrize("r", [0, -3, 2.5, "8", True, None])
def test_config_rejects_bad_rank(r):
    with pytest.raises(ValueError, match="r must be"):
        LoraConfig(r=r)


@pytest.mark.parametrize("alpha", [0, -1.0, float("nan")])
def test_config_rejects_bad_alpha(alpha):
    with pytest.raises(ValueError, match="lora_alpha"):
        LoraConfig(lora_alpha=alpha)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_config_rejects_dropout_outside_unit_interval(p):
    with pytest.raises(ValueError, match="lora_dropout"):
        LoraConfig(lora_dropout=p)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4"])
def test_config_refuses_dropout_with_pissa(init):
    with pytest.raises(ValueError, match="PiSSA"):
        LoraConfig(init_lora_weights=init, lora_dropout=0.1)
    LoraConfig(init_lora_weights=init, lora_dropout=0.0)  # fine


@pytest.mark.parametrize("init", ["kaiming", "PISSA", "pissa_niter_", "pissa_niter_x", "olora", 1, 0.5])
def test_config_rejects_unknown_init_and_lists_choices(init):
    with pytest.raises(ValueError) as err:
        LoraConfig(init_lora_weights=init)
    message = str(err.value)
    for choice in ("True", "False", "'gaussian'", "'pissa'", "pissa_niter_K"):
        assert choice in message, message


@pytest.mark.parametrize("init", [True, False, "gaussian", "pissa", "pissa_niter_0", "pissa_niter_16"])
def test_config_accepts_documented_inits(init):
    assert LoraConfig(init_lora_weights=init).init_lora_weights == init


@pytest.mark.parametrize("bias", ["some", "None", None, "lora"])
def test_config_rejects_bad_bias(bias):
    with pytest.raises(ValueError, match="bias"):
        LoraConfig(bias=bias)


def test_rank_larger_than_layer_refused_at_wrap_time_naming_size():
    rng = np.random.default_rng(0)
    config = LoraConfig(r=6)  # fine on its own: the layer decides
    with pytest.raises(ValueError) as err:
        LoraLinear(Linear(12, 5, rng=rng), config, rng)
    message = str(err.value)
    assert "12" in message and "5" in message and "r=6" in message
    LoraLinear(Linear(12, 5, rng=rng), LoraConfig(r=5), rng)  # r = min(d_in, d_out) is allowed
    with pytest.raises(ValueError, match="16"):
        get_peft_model(base_gpt(), LoraConfig(r=17))


def test_refused_wrap_leaves_model_untouched():
    """A rank that fits q_proj (16x16) but not the 3-label score head (16->3) is refused, and the
    model must be left as it was: not half-wrapped, not frozen (else a retry with a smaller r
    fails on the already-wrapped layers)."""
    model = base_classifier()
    before = snapshot(model)
    with pytest.raises(ValueError, match="3"):
        get_peft_model(model, LoraConfig(r=4, target_modules=("q_proj", "score")))
    assert lora_names(model) == []
    assert all(p.requires_grad for p in model.parameters())
    assert snapshot(model).keys() == before.keys()
    get_peft_model(model, LoraConfig(r=3, target_modules=("q_proj", "score")))  # retry works


# ==== target_modules ==============================================================================
def test_targets_by_suffix_follow_peft_rule():
    model = base_gpt()
    names = [n for n, _ in find_targets(model, ("q_proj", "v_proj"))]
    expected = [f"blocks.{i}.attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert sorted(names) == sorted(expected)


@pytest.mark.parametrize("targets, expected", [
    (("blocks.1.attn.q_proj",), ["blocks.1.attn.q_proj"]),       # full name
    (("attn.k_proj",), ["blocks.0.attn.k_proj", "blocks.1.attn.k_proj"]),  # dotted suffix
    (("0.mlp.fc2", "lm_head"), ["blocks.0.mlp.fc2", "lm_head"]),  # explicit head is allowed
    (r"blocks\.1\.mlp\.fc\d", ["blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]),  # str: regex fullmatch
    (r".*_proj", [f"blocks.{i}.attn.{p}" for i in range(2)
                  for p in ("q_proj", "k_proj", "v_proj", "out_proj")]),
])
def test_target_matching(targets, expected):
    model = base_gpt()
    assert sorted(n for n, _ in find_targets(model, targets)) == sorted(expected)
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=targets))
    assert sorted(lora_names(peft.base_model)) == sorted(expected)


@pytest.mark.parametrize("targets", [("proj",), ("_proj",), ("attn.q",), "q_proj", "blocks.0"])
def test_partial_names_do_not_match(targets):
    """"proj" is not a dotted suffix of "blocks.0.attn.q_proj"; a string is a regex that must
    match the *whole* name, so "q_proj" as a string matches nothing (as in PEFT)."""
    model = base_gpt()
    with pytest.raises(ValueError) as err:
        find_targets(model, targets)
    for name in linear_names(model):  # the error lists what exists
        assert name in str(err.value)


def test_zero_matches_error_lists_linear_layers_and_leaves_model():
    model = base_gpt()
    before = snapshot(model)
    with pytest.raises(ValueError) as err:
        get_peft_model(model, LoraConfig(target_modules=("query", "value")))
    for name in linear_names(model):
        assert name in str(err.value)
    assert lora_names(model) == [] and all(p.requires_grad for p in model.parameters())
    after = snapshot(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_all_linear_skips_output_heads():
    gpt = base_gpt()
    expected = [n for n in linear_names(gpt) if n != "lm_head"]
    assert len(expected) == 2 * 6
    assert [n for n, _ in find_targets(gpt, "all-linear")] == expected
    clf = base_classifier()
    expected = [n for n in linear_names(clf) if not n.endswith(("lm_head", "score"))]
    assert sorted(n for n, _ in find_targets(clf, "all-linear")) == sorted(expected)
    assert len(expected) == 2 * 6


@pytest.mark.parametrize("targets", [("ln_1",), ("blocks.0.ln_2",), ("attn",), r"blocks\.0\.attn"])
def test_targeting_non_linear_is_an_error(targets):
    model = base_gpt()
    with pytest.raises(ValueError, match="Linear"):
        get_peft_model(model, LoraConfig(target_modules=targets))
    assert lora_names(model) == []


# ==== initialisation ==============================================================================
@pytest.mark.parametrize("init", [True, "gaussian"])
def test_lora_init_equals_base_exactly(init):
    x = ids(np.random.default_rng(0))
    expected = logits(base_gpt(), x)
    peft = get_peft_model(base_gpt(), LoraConfig(r=4, init_lora_weights=init, target_modules="all-linear"))
    assert len(peft.lora_layers()) == 12
    np.testing.assert_array_equal(logits(peft, x), expected)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2"])
def test_pissa_init_equals_base_within_float32(init):
    x = ids(np.random.default_rng(0))
    expected = logits(base_gpt(), x)
    peft = get_peft_model(base_gpt(), LoraConfig(r=4, lora_alpha=8, init_lora_weights=init,
                                                 target_modules="all-linear"))
    got = logits(peft, x)
    np.testing.assert_allclose(got, expected, **F32)
    # ... and PiSSA really moved the principal part out of the frozen weights
    with peft.disable_adapter():
        assert np.abs(logits(peft, x) - expected).max() > 1e-2


def _big_layer(init, r=32, d_in=512, d_out=64, seed=0):
    rng = np.random.default_rng(seed)
    return LoraLinear(Linear(d_in, d_out, rng=rng), LoraConfig(r=r, init_lora_weights=init), rng)


def test_default_init_is_kaiming_uniform_and_b_zero():
    layer = _big_layer(True)
    A, Bm = _np(layer.lora_A["default"].weight.data), _np(layer.lora_B["default"].weight.data)
    bound = 1.0 / math.sqrt(512)
    assert A.shape == (32, 512) and Bm.shape == (64, 32)
    assert np.all(np.abs(A) <= bound)
    assert A.max() > 0.99 * bound and A.min() < -0.99 * bound  # spans the whole interval
    assert abs(A.std() / (bound / math.sqrt(3)) - 1) < 0.02      # U(-b, b) has std b/√3
    assert abs(A.mean()) < 0.02 * bound
    assert np.all(Bm == 0)
    assert A.dtype == np.float32 and Bm.dtype == np.float32


def test_gaussian_init_has_std_one_over_r():
    for r in (4, 16):
        layer = _big_layer("gaussian", r=r)
        A = _np(layer.lora_A["default"].weight.data)
        assert abs(A.std() * r - 1) < 0.03
        assert abs(A.mean()) < 4 / r / np.sqrt(A.size)  # 4 standard errors of the mean
        assert np.abs(A).max() > 3 / r  # not uniform: a normal has tails
        assert np.all(_np(layer.lora_B["default"].weight.data) == 0)


@pytest.mark.parametrize("r, alpha, rslora, expected", [
    (4, 12, False, 3.0), (8, 8, False, 1.0), (16, 4, False, 0.25),
    (4, 12, True, 6.0), (16, 8, True, 2.0), (9, 3, True, 1.0)])
def test_scaling(r, alpha, rslora, expected):
    config = LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora)
    assert config.scaling == pytest.approx(expected)
    rng = np.random.default_rng(0)
    layer = LoraLinear(Linear(16, 16, rng=rng), config, rng)
    assert layer.scaling["default"] == pytest.approx(expected)


# ==== counting ====================================================================================
def _base_param_count(c):
    d, v, t = c.n_embd, c.vocab_size, c.block_size
    per_block = (4 * d * d + 4 * d) + (8 * d * d + 5 * d) + 4 * d
    return v * d + t * d + c.n_layer * per_block + 2 * d + v * d


@pytest.mark.parametrize("targets, r", [(("q_proj", "v_proj"), 4), ("all-linear", 3), (("fc1",), 8)])
def test_trainable_count_and_printout(capsys, targets, r):
    c = tiny()
    d = c.n_embd
    shapes = {"q_proj": (d, d), "k_proj": (d, d), "v_proj": (d, d), "out_proj": (d, d),
              "fc1": (d, 4 * d), "fc2": (4 * d, d)}  # (d_in, d_out)
    chosen = shapes if targets == "all-linear" else {k: shapes[k] for k in targets}
    trainable = c.n_layer * sum(r * (d_in + d_out) for d_in, d_out in chosen.values())
    total = _base_param_count(c) + trainable
    peft = get_peft_model(GPT(c), LoraConfig(r=r, target_modules=targets))
    assert peft.get_nb_trainable_parameters() == (trainable, total)
    assert peft.num_parameters(trainable_only=True) == trainable
    peft.print_trainable_parameters()
    printed = capsys.readouterr().out
    pct = 100 * trainable / total
    expected = f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {pct:.4f}\n"
    assert printed == expected
    assert "," in printed.split("||")[1]  # the total has a thousands separator


# ==== freezing, biases, modules_to_save ===========================================================
def _inner(model):
    """The wrapped model of a PeftModel (parameter names as in the base model), else itself."""
    return model.base_model if isinstance(model, PeftModel) else model


def _trainable(model):
    return {n for n, p in _inner(model).named_parameters() if p.requires_grad}


def test_freezes_everything_but_adapters():
    peft = get_peft_model(base_gpt(), LoraConfig(r=2))
    layers = [f"blocks.{i}.attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert _trainable(peft.base_model) == {f"{n}.lora_{x}.default.weight" for n in layers for x in "AB"}
    assert isinstance(peft.base_model.get_submodule(layers[0]).base_layer, Linear)
    assert not peft.base_model.get_submodule(layers[0]).base_layer.weight.requires_grad


def test_bias_modes_train_exactly_the_right_biases():
    layers = [f"blocks.{i}.attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    adapters = {f"{n}.lora_{x}.default.weight" for n in layers for x in "AB"}
    all_bias = {n for n, _ in base_gpt().named_parameters() if n.endswith(".bias")}
    # wrapped layers' biases now live under base_layer
    all_bias = {(n[:-len(".bias")] + ".base_layer.bias") if n[:-len(".bias")] in layers else n
                for n in all_bias}
    assert len(all_bias) == 2 * (6 + 2) + 1  # 6 Linears + 2 LayerNorms per block, plus ln_f

    assert _trainable(get_peft_model(base_gpt(), LoraConfig(r=2, bias="none")).base_model) == adapters
    assert _trainable(get_peft_model(base_gpt(), LoraConfig(r=2, bias="all")).base_model) == adapters | all_bias
    assert (_trainable(get_peft_model(base_gpt(), LoraConfig(r=2, bias="lora_only")).base_model)
            == adapters | {f"{n}.base_layer.bias" for n in layers})


def test_modules_to_save_trains_the_score_head():
    peft = get_peft_model(base_classifier(), LoraConfig(r=2, modules_to_save=["score"]))
    layers = [f"transformer.blocks.{i}.attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert _trainable(peft.base_model) == {f"{n}.lora_{x}.default.weight" for n in layers for x in "AB"} | {"score.weight"}
    d = TINY["n_embd"]
    assert peft.num_parameters(trainable_only=True) == 4 * 2 * (d + d) + 3 * d


def test_modules_to_save_without_match_is_an_error():
    with pytest.raises(ValueError, match="modules_to_save"):
        get_peft_model(base_classifier(), LoraConfig(r=2, modules_to_save=("classifier",)))


# ==== the forward formula and its gradient ========================================================
def _nonzero_layer(d_in=7, d_out=5, r=3, alpha=6.0, dropout=0.0, bias=True, rslora=False, seed=0):
    rng = np.random.default_rng(seed)
    base = Linear(d_in, d_out, bias=bias, rng=rng)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights=False,
                        use_rslora=rslora)
    return LoraLinear(base, config, rng)


@pytest.mark.parametrize("bias, rslora", [(True, False), (False, False), (True, True)])
def test_lora_forward_matches_formula(bias, rslora):
    layer = _nonzero_layer(bias=bias, rslora=rslora)
    W, A, Bm = (_np(p.data).astype(np.float64) for p in
                (layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight))
    assert np.abs(A).max() > 0 and np.abs(Bm).max() > 0
    s = 6.0 / (math.sqrt(3) if rslora else 3)
    x = np.random.default_rng(1).standard_normal((2, 4, 7)).astype(np.float32)
    expected = x @ W.T + s * (x @ A.T) @ Bm.T
    if bias:
        expected = expected + _np(layer.base_layer.bias.data)
    got = layer(Tensor(x))
    assert got.shape == (2, 4, 5) and got.dtype == np.float32
    np.testing.assert_allclose(_np(got.data), expected, rtol=1e-5, atol=1e-5)


def test_lora_dropout_touches_only_the_lora_path():
    p = 0.5
    layer = _nonzero_layer(d_in=32, dropout=p)
    W, b, A, Bm = (_np(t.data).astype(np.float64) for t in
                   (layer.base_layer.weight, layer.base_layer.bias, layer.lora_A["default"].weight, layer.lora_B["default"].weight))
    s = 2.0
    x = np.random.default_rng(1).standard_normal((3, 6, 32)).astype(np.float32)
    # eval mode: no dropout anywhere
    layer.eval()
    np.testing.assert_allclose(_np(layer(Tensor(x)).data), x @ W.T + b + s * (x @ A.T) @ Bm.T,
                               rtol=1e-5, atol=1e-5)
    # training: replay the layer's own generator to know the mask it draws
    layer.train()
    replay = copy.deepcopy(layer.lora_dropout["default"].rng)
    mask = (replay.random(x.shape, dtype="float32") >= p) / (1 - p)
    assert 0.3 < (mask == 0).mean() < 0.7
    got = _np(layer(Tensor(x)).data)
    np.testing.assert_allclose(got, x @ W.T + b + s * ((x * mask) @ A.T) @ Bm.T, rtol=1e-5, atol=1e-5)
    # the base path x W0ᵀ + b is never dropped: the remainder is exactly the rank-r LoRA term
    lora_part = got - (x @ W.T + b)
    assert np.linalg.matrix_rank(lora_part.reshape(-1, 5), tol=1e-4) <= 3


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_lora_linear_gradcheck(t64, rng, with_mask, with_bias):
    x, W, A, Bm = t64(2, 3, 5), t64(4, 5), t64(3, 5), t64(4, 3)
    b = t64(4) if with_bias else None
    mask = backend.asarray((rng.random((2, 3, 5)) >= 0.4) / 0.6) if with_mask else None
    inputs = [x, W, A, Bm] + ([b] if with_bias else [])

    def fn(x, W, A, Bm, *rest):
        return F.lora_linear(x, W, rest[0] if rest else None, A, Bm, 1.7, mask)
    assert gradcheck(fn, inputs)


def test_lora_linear_frozen_weight_gets_no_gradient(t64):
    x, A, Bm, b = t64(2, 3, 5), t64(3, 5), t64(4, 3), t64(4, requires_grad=False)
    W = t64(4, 5, requires_grad=False)
    out = F.lora_linear(x, W, b, A, Bm, 2.0)
    (out * out).sum().backward()
    assert W.grad is None and b.grad is None
    assert x.grad is not None and A.grad is not None and Bm.grad is not None
    # the gradients that are computed are still right
    assert gradcheck(lambda x, A, Bm: F.lora_linear(x, W, b, A, Bm, 2.0), [x, A, Bm])


def test_lora_linear_never_computes_dW_for_a_frozen_weight():
    """Not only is W.grad left None: no W-sized gradient is ever allocated (DESIGN §3, the
    time and memory LoRA saves). Measured as backward's peak allocation with tracemalloc."""
    import tracemalloc
    rng = np.random.default_rng(0)
    d, r = 1024, 4  # W is 4 MiB in float32; x, A, B are a few KiB
    W = Tensor(rng.standard_normal((d, d)).astype(np.float32))
    A = Tensor(rng.standard_normal((r, d)).astype(np.float32), requires_grad=True)
    Bm = Tensor(rng.standard_normal((d, r)).astype(np.float32), requires_grad=True)
    x = Tensor(rng.standard_normal((2, d)).astype(np.float32), requires_grad=True)

    def peak_backward_bytes():
        out = F.lora_linear(x, W, None, A, Bm, 2.0).sum()
        tracemalloc.start()
        out.backward()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak
    frozen_peak = peak_backward_bytes()
    assert W.grad is None and A.grad is not None and Bm.grad is not None and x.grad is not None
    assert frozen_peak < W.data.nbytes / 4, frozen_peak
    W.requires_grad = True  # the same step with W trainable does build dW
    assert peak_backward_bytes() >= W.data.nbytes
    assert W.grad.shape == W.shape


def test_frozen_weights_get_no_grad_in_a_model():
    peft = get_peft_model(base_gpt(), LoraConfig(r=2, target_modules="all-linear"))
    randomize_adapters(peft)
    x, y = lm_batch(np.random.default_rng(0))
    peft(x, y)[1].backward()
    for name, p in peft.base_model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and np.abs(_np(p.grad)).max() > 0, name
        else:
            assert p.grad is None, name


# ==== merge, unmerge, merge_and_unload, disable_adapter ==========================================
def _adapted(init=False, **kw):
    peft = get_peft_model(base_gpt(), LoraConfig(r=3, lora_alpha=6, init_lora_weights=init, **kw))
    randomize_adapters(peft)
    return peft


def test_merge_unmerge_roundtrip():
    x = ids(np.random.default_rng(0))
    base = logits(base_gpt(), x)
    peft = _adapted(target_modules="all-linear")
    unmerged = logits(peft, x)
    assert np.abs(unmerged - base).max() > 1e-2  # the adapters do something
    w0 = {n: _np(l.base_layer.weight.data).copy() for n, l in peft.lora_layers()}
    deltas = {n: 2.0 * _np(l.lora_B["default"].weight.data).astype(np.float64) @ _np(l.lora_A["default"].weight.data) for n, l in peft.lora_layers()}

    peft.merge_adapter()
    for n, layer in peft.lora_layers():
        assert layer.merged
        np.testing.assert_allclose(_np(layer.base_layer.weight.data), w0[n] + deltas[n], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits(peft, x), unmerged, **F32)
    peft.merge_adapter()  # merging twice must not add ΔW twice
    np.testing.assert_allclose(logits(peft, x), unmerged, **F32)

    peft.unmerge_adapter()
    for n, layer in peft.lora_layers():
        assert not layer.merged
        np.testing.assert_allclose(_np(layer.base_layer.weight.data), w0[n], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits(peft, x), unmerged, **F32)


def test_merge_and_unload_returns_plain_gpt():
    x = ids(np.random.default_rng(0))
    peft = _adapted(target_modules="all-linear", bias="all")
    expected = logits(peft, x)
    plain = peft.merge_and_unload()
    assert type(plain) is GPT
    assert not any(isinstance(m, LoraLinear) for _, m in plain.named_modules())
    assert set(plain.state_dict()) == set(base_gpt().state_dict())
    np.testing.assert_allclose(logits(plain, x), expected, **F32)
    # the merged weights are W0 + s B A
    fresh = base_gpt()
    q0 = _np(fresh.blocks[0].attn.q_proj.weight.data)
    assert not np.allclose(_np(plain.blocks[0].attn.q_proj.weight.data), q0)


@pytest.mark.parametrize("merged", [False, True])
def test_disable_adapter_gives_base_model(merged):
    x = ids(np.random.default_rng(0))
    base = logits(base_gpt(), x)
    peft = _adapted(target_modules="all-linear")
    adapted = logits(peft, x)
    if merged:
        peft.merge_adapter()
    with peft.disable_adapter():
        inside = logits(peft, x)
        assert all(not layer.merged for _, layer in peft.lora_layers())
    if merged:
        np.testing.assert_allclose(inside, base, **F32)
    else:
        np.testing.assert_array_equal(inside, base)
    assert all(layer.merged == merged for _, layer in peft.lora_layers())
    np.testing.assert_allclose(logits(peft, x), adapted, **F32)


def test_disable_adapter_reenables_after_an_exception():
    x = ids(np.random.default_rng(0))
    peft = _adapted()
    adapted = logits(peft, x)
    with pytest.raises(KeyError):
        with peft.disable_adapter():
            raise KeyError("boom")
    np.testing.assert_array_equal(logits(peft, x), adapted)


# ==== what training touches ======================================================================
def test_lora_training_touches_only_adapters():
    peft = get_peft_model(base_gpt(), LoraConfig(r=2, target_modules="all-linear"))
    before = snapshot(peft.base_model)
    trainable = _trainable(peft)
    quick_train(peft, steps=3)
    after = snapshot(peft.base_model)
    assert before.keys() == after.keys()
    for name in before:
        if name in trainable:
            assert not np.array_equal(before[name], after[name]), f"{name} did not train"
        else:
            assert np.array_equal(before[name], after[name]), f"frozen {name} changed"
            assert after[name].tobytes() == before[name].tobytes()
    assert all(n.endswith(("lora_A.default.weight", "lora_B.default.weight")) for n in trainable)
    for name, p in peft.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name


def test_training_with_modules_to_save_moves_the_head_too():
    peft = get_peft_model(base_classifier(), LoraConfig(r=2, modules_to_save=("score",), bias="lora_only"))

    def batch_fn(rng):
        return rng.integers(0, TINY["vocab_size"], size=(4, 7)), None, rng.integers(0, 3, size=4)
    before = snapshot(peft.base_model)
    trainable = _trainable(peft)
    assert "score.weight" in trainable and "transformer.blocks.0.attn.q_proj.base_layer.bias" in trainable
    quick_train(peft, steps=3, batch_fn=batch_fn)
    after = snapshot(peft.base_model)
    for name in before:
        changed = not np.array_equal(before[name], after[name])
        assert changed == (name in trainable), name


def test_optimizer_state_only_for_adapters():
    peft = get_peft_model(base_gpt(), LoraConfig(r=2))
    trainable = {id(p) for p in peft.parameters() if p.requires_grad}
    frozen = [p for p in peft.parameters() if not p.requires_grad]
    for opt in (AdamW(peft.parameters(), lr=1e-3),  # handed every parameter: frozen ones dropped
                AdamW(param_groups_for_weight_decay(peft.named_parameters(), 0.1), lr=1e-3)):
        x, y = lm_batch(np.random.default_rng(0))
        opt.zero_grad()
        peft(x, y)[1].backward()
        opt.step()
        assert {id(p) for p in opt.state} == trainable
        assert {id(p) for g in opt.param_groups for p in g["params"]} == trainable
        assert all(p not in opt.state for p in frozen)
        n_state = sum(v.size for s in opt.state.values() for v in s.values() if hasattr(v, "size"))
        assert n_state == 2 * peft.num_parameters(trainable_only=True)


# ==== PiSSA =======================================================================================
def _pissa_layer(W, r, alpha, init="pissa", rslora=False, seed=0):
    rng = np.random.default_rng(seed)
    lin = Linear(W.shape[1], W.shape[0], rng=rng)
    lin.weight.data[...] = backend.asarray(W.astype(np.float32))
    return LoraLinear(lin, LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=init,
                                      use_rslora=rslora), np.random.default_rng(seed))


@pytest.mark.parametrize("shape, r, alpha, rslora", [((20, 12), 4, 8, False), ((12, 30), 5, 3, False),
                                                     ((16, 16), 4, 8, True)])
def test_pissa_factors_are_the_principal_part(shape, r, alpha, rslora):
    W0 = np.random.default_rng(3).standard_normal(shape).astype(np.float32).astype(np.float64)
    layer = _pissa_layer(W0, r, alpha, rslora=rslora)
    s = alpha / (math.sqrt(r) if rslora else r)
    assert layer.scaling["default"] == pytest.approx(s)
    A, Bm = _np(layer.lora_A["default"].weight.data).astype(np.float64), _np(layer.lora_B["default"].weight.data).astype(np.float64)
    W_res = _np(layer.base_layer.weight.data).astype(np.float64)
    assert A.shape == (r, shape[1]) and Bm.shape == (shape[0], r)
    scale = np.abs(W0).max()
    np.testing.assert_allclose(W_res + s * Bm @ A, W0, atol=1e-5 * scale)
    np.testing.assert_allclose(s * Bm @ A, svd_truncation(W0, r), atol=1e-5 * scale)
    S = np.linalg.svd(W0, compute_uv=False)
    # A = √(S_r/s) V_rᵀ and B = U_r √(S_r/s): row norms of A and column norms of B are √(S_r/s)
    np.testing.assert_allclose(np.linalg.norm(A, axis=1), np.sqrt(S[:r] / s), rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(Bm, axis=0), np.sqrt(S[:r] / s), rtol=1e-5)
    # the residual holds exactly the remaining singular values
    np.testing.assert_allclose(np.linalg.svd(W_res, compute_uv=False)[:len(S) - r], S[r:],
                               rtol=1e-4, atol=1e-5 * scale)


def test_pissa_randomized_svd_approaches_exact():
    """With a decaying spectrum, the rank-r part found with K power iterations gets closer to the
    exact truncation as K grows; niter 0 is clearly worse."""
    rng = np.random.default_rng(4)
    d, r = 48, 4
    U, _ = np.linalg.qr(rng.standard_normal((d, d)))
    V, _ = np.linalg.qr(rng.standard_normal((d, d)))
    W0 = ((U * 0.85 ** np.arange(d)) @ V.T).astype(np.float32).astype(np.float64)
    best = svd_truncation(W0, r)
    errors = []
    for init in ("pissa_niter_0", "pissa_niter_1", "pissa_niter_2", "pissa_niter_4", "pissa_niter_8",
                 "pissa_niter_16", "pissa"):
        layer = _pissa_layer(W0, r, 8, init)
        s = layer.scaling["default"]
        A, Bm = _np(layer.lora_A["default"].weight.data).astype(np.float64), _np(layer.lora_B["default"].weight.data).astype(np.float64)
        # whatever the SVD, the layer still computes W0 at step 0
        np.testing.assert_allclose(_np(layer.base_layer.weight.data) + s * Bm @ A, W0, atol=1e-5)
        errors.append(np.linalg.norm(s * Bm @ A - best))
    assert errors[0] > 2 * errors[2], errors  # two power iterations already halve the error
    for a, b in zip(errors[:-1], errors[1:-1]):
        assert b <= a * 1.001 + 1e-6, errors
    assert errors[-2] < 1e-2 * errors[0], errors  # niter 16 is essentially exact
    assert errors[-1] < 1e-5


@pytest.mark.parametrize("rslora", [False, True])
def test_pissa_to_lora_conversion_reproduces_trained_model(tmp_path, rslora):
    r, alpha = 3, 6
    x = ids(np.random.default_rng(0))
    config = LoraConfig(r=r, lora_alpha=alpha, init_lora_weights="pissa", use_rslora=rslora,
                        target_modules="all-linear")
    peft = get_peft_model(base_gpt(), config)
    quick_train(peft, steps=4, lr=3e-2)
    trained = logits(peft, x)
    assert np.abs(trained - logits(base_gpt(), x)).max() > 1e-3  # training changed the model

    peft.save_pretrained(tmp_path / "conv", convert_pissa_to_lora=True)
    saved = json.loads((tmp_path / "conv" / "adapter_config.json").read_text())
    assert saved["r"] == 2 * r
    assert saved["lora_alpha"] == pytest.approx(alpha * (math.sqrt(2) if rslora else 2))
    assert LoraConfig.from_dict(saved).scaling == pytest.approx(config.scaling)
    arrays = load_file(str(tmp_path / "conv" / "adapter_model.safetensors"))
    for name, layer in peft.lora_layers():
        d_out, d_in = layer.base_layer.weight.shape
        assert arrays[f"base_model.model.{name}.lora_A.weight"].shape == (2 * r, d_in)
        assert arrays[f"base_model.model.{name}.lora_B.weight"].shape == (d_out, 2 * r)

    fresh = base_gpt()  # the ORIGINAL base, never touched by PiSSA
    original = snapshot(fresh)
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "conv")
    for name, layer in loaded.lora_layers():  # the base weights stay W0, not W_res
        np.testing.assert_array_equal(_np(layer.base_layer.weight.data), original[f"{name}.weight"])
        assert layer.scaling["default"] == pytest.approx(config.scaling)
    np.testing.assert_allclose(logits(loaded, x), trained, rtol=1e-4, atol=1e-4)


def test_convert_pissa_to_lora_refused_for_plain_lora(tmp_path):
    peft = get_peft_model(base_gpt(), LoraConfig(r=2))
    with pytest.raises(ValueError, match="PiSSA"):
        peft.save_pretrained(tmp_path / "a", convert_pissa_to_lora=True)


# ==== adapter files ==============================================================================
def _expected_adapter_keys(peft):
    """PEFT's keys on disk: prefix base_model.model., adapter name removed."""
    return {f"base_model.model.{n}.lora_{x}.weight" for n in lora_names(peft.base_model) for x in "AB"}


def test_save_pretrained_holds_only_adapter_arrays_and_roundtrips(tmp_path):
    x = ids(np.random.default_rng(0))
    config = LoraConfig(r=3, lora_alpha=5, target_modules=("q_proj", "fc2"))
    peft = get_peft_model(base_gpt(), config)
    quick_train(peft, steps=2)
    expected = logits(peft, x)
    peft.save_pretrained(tmp_path / "ad")
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == ["adapter_config.json",
                                                                   "adapter_model.safetensors"]
    arrays = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert set(arrays) == _expected_adapter_keys(peft)
    params = dict(peft.base_model.named_parameters())
    for k, v in arrays.items():
        assert v.dtype == np.float32
        internal = k[len("base_model.model."):].replace(".weight", ".default.weight")
        np.testing.assert_array_equal(v, _np(params[internal].data))
    n_saved = sum(v.size for v in arrays.values())
    assert n_saved == peft.num_parameters(trainable_only=True) == 2 * (3 * 32 + 3 * 80)

    loaded = PeftModel.from_pretrained(base_gpt(), tmp_path / "ad")
    assert loaded.active_peft_config.to_dict() == config.to_dict()
    np.testing.assert_array_equal(logits(loaded, x), expected)
    assert _trainable(loaded) == set()  # PEFT's default: loaded for inference, frozen
    trainable = PeftModel.from_pretrained(base_gpt(), tmp_path / "ad", is_trainable=True)
    assert _trainable(trainable) == _trainable(peft)


def test_save_pretrained_with_biases_and_modules_to_save(tmp_path):
    rng = np.random.default_rng(0)
    x = ids(rng)
    config = LoraConfig(r=2, bias="all", modules_to_save=("score",))
    peft = get_peft_model(base_classifier(), config)

    def batch_fn(rng):
        return rng.integers(0, TINY["vocab_size"], size=(4, 7)), None, rng.integers(0, 3, size=4)
    quick_train(peft, steps=2, batch_fn=batch_fn)
    expected = logits(peft, x)
    peft.save_pretrained(tmp_path / "ad")
    keys = set(load_file(str(tmp_path / "ad" / "adapter_model.safetensors")))
    bias_keys = {f"base_model.model.{n}" for n, p in peft.base_model.named_parameters() if n.endswith(".bias")}
    assert keys == _expected_adapter_keys(peft) | bias_keys | {"base_model.model.score.weight"}
    loaded = PeftModel.from_pretrained(base_classifier(), tmp_path / "ad")
    np.testing.assert_array_equal(logits(loaded, x), expected)


def _assert_untouched(model, before):
    after = snapshot(model)
    assert after.keys() == before.keys()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert lora_names(model) == []
    assert all(p.requires_grad for p in model.parameters())


@pytest.fixture
def saved_adapter(tmp_path):
    peft = get_peft_model(base_gpt(), LoraConfig(r=2, target_modules=("q_proj", "v_proj")))
    randomize_adapters(peft)
    return peft.save_pretrained(tmp_path / "ad")


@pytest.mark.parametrize("other", [dict(n_embd=24), dict(n_layer=1), dict(n_layer=3)])
def test_loading_into_another_model_is_a_clear_error(saved_adapter, other):
    model = base_gpt(**other)
    before = snapshot(model)
    with pytest.raises(ValueError, match="does not fit"):
        PeftModel.from_pretrained(model, saved_adapter)
    _assert_untouched(model, before)


@pytest.mark.parametrize("targets", [["k_proj", "v_proj"], ["q_proj"], ["q_proj", "v_proj", "fc1"]])
def test_loading_with_edited_target_modules_is_a_clear_error(saved_adapter, targets):
    path = saved_adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config["target_modules"] = targets
    path.write_text(json.dumps(config))
    model = base_gpt()
    before = snapshot(model)
    with pytest.raises(ValueError, match="does not fit"):
        PeftModel.from_pretrained(model, saved_adapter)
    _assert_untouched(model, before)


def test_loading_with_a_target_the_model_lacks(saved_adapter):
    path = saved_adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config["target_modules"] = ["c_attn"]
    path.write_text(json.dumps(config))
    model = base_gpt()
    before = snapshot(model)
    with pytest.raises(ValueError):
        PeftModel.from_pretrained(model, saved_adapter)
    _assert_untouched(model, before)


def test_loading_a_classifier_adapter_into_a_plain_gpt(tmp_path):
    peft = get_peft_model(base_classifier(), LoraConfig(r=2, modules_to_save=("score",)))
    peft.save_pretrained(tmp_path / "ad")
    model = base_gpt()
    before = snapshot(model)
    with pytest.raises(ValueError):
        PeftModel.from_pretrained(model, tmp_path / "ad")
    _assert_untouched(model, before)


# ==== adjust_rank =================================================================================
@pytest.mark.parametrize("rslora", [False, True])
def test_adjust_rank_is_the_best_rank_k_update(rslora):
    r, k, alpha = 6, 3, 12
    peft = get_peft_model(base_gpt(), LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora,
                                                 target_modules=("q_proj", "fc1")))
    randomize_adapters(peft)
    old = {n: l.scaling["default"] * (_np(l.lora_B["default"].weight.data).astype(np.float64) @ _np(l.lora_A["default"].weight.data))
           for n, l in peft.lora_layers()}
    peft.adjust_rank(k)
    s_new = alpha / (math.sqrt(k) if rslora else k)
    assert peft.active_peft_config.r == k
    for n, layer in peft.lora_layers():
        assert layer.r["default"] == k and layer.scaling["default"] == pytest.approx(s_new)
        d_out, d_in = layer.base_layer.weight.shape
        assert layer.lora_A["default"].weight.shape == (k, d_in) and layer.lora_B["default"].weight.shape == (d_out, k)
        assert layer.lora_A["default"].weight.requires_grad and layer.lora_B["default"].weight.requires_grad
        new = s_new * (_np(layer.lora_B["default"].weight.data).astype(np.float64) @ _np(layer.lora_A["default"].weight.data))
        scale = np.abs(old[n]).max()
        np.testing.assert_allclose(new, svd_truncation(old[n], k), atol=1e-5 * scale)
        S = np.linalg.svd(old[n], compute_uv=False)
        np.testing.assert_allclose(np.sum((old[n] - new) ** 2), np.sum(S[k:r] ** 2), rtol=1e-3)
    assert peft.num_parameters(trainable_only=True) == 2 * k * (32 + 80)
    # the truncated adapter still trains and saves
    quick_train(peft, steps=1)


def test_adjust_rank_refused_while_merged():
    peft = _adapted()
    peft.merge_adapter()
    before = snapshot(peft.base_model)
    with pytest.raises(RuntimeError, match="merge"):
        peft.adjust_rank(2)
    after = snapshot(peft.base_model)
    assert after.keys() == before.keys() and all(np.array_equal(before[k], after[k]) for k in before)
    assert all(layer.r["default"] == 3 for _, layer in peft.lora_layers())


def test_adjust_rank_refusal_changes_no_layer():
    """If any layer is merged, the refusal must come before any layer is truncated."""
    peft = _adapted()
    names = [n for n, _ in peft.lora_layers()]
    peft.base_model.get_submodule(names[-1]).merge()  # only the last one
    before = snapshot(peft.base_model)
    with pytest.raises(RuntimeError):
        peft.adjust_rank(2)
    assert all(layer.r["default"] == 3 for _, layer in peft.lora_layers())
    assert peft.active_peft_config.r == 3
    after = snapshot(peft.base_model)
    assert after.keys() == before.keys() and all(np.array_equal(before[k], after[k]) for k in before)


def test_pissa_conversion_after_adjust_rank(tmp_path):
    """A trained PiSSA adapter truncated with adjust_rank(k) still converts to a LoRA adapter for
    the original base: ΔW = s'·B'A' − s·B0 A0 (two different scales now) must be saved so that
    loading it onto W0 reproduces the model, or the conversion must be refused up front."""
    x = ids(np.random.default_rng(0))
    peft = get_peft_model(base_gpt(), LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa"))
    quick_train(peft, steps=3, lr=3e-2)
    peft.adjust_rank(2)
    trained = logits(peft, x)
    try:
        peft.save_pretrained(tmp_path / "conv", convert_pissa_to_lora=True)
    except ValueError:
        return  # refusing is acceptable
    loaded = PeftModel.from_pretrained(base_gpt(), tmp_path / "conv")
    np.testing.assert_allclose(logits(loaded, x), trained, rtol=1e-4, atol=1e-4)
