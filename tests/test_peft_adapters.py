"""Many named adapters on one model (PEFT's API), mixed-batch serving, adapter arithmetic
(``add_weighted_adapter``), LoRA+ parameter groups, LoRA on an Embedding, config type checks."""
import json

import numpy as np
import pytest

from lora_numpy import Tensor, backend
from lora_numpy.gradcheck import gradcheck
from lora_numpy.models import GPT, GPTConfig
from lora_numpy.nn import Embedding
from lora_numpy.optim import SGD, AdamW
from lora_numpy.peft import (LoraConfig, LoraEmbedding, PeftModel, create_loraplus_optimizer,
                             get_peft_model)

TINY = dict(vocab_size=15, block_size=16, n_layer=2, n_head=2, n_embd=16)


def _np(a):
    return backend.to_numpy(a)


def gpt(seed=0):
    model = GPT(GPTConfig(**TINY), seed)
    rng = np.random.default_rng(seed + 100)
    for _, p in model.named_parameters():  # order-1 weights, so differences show
        p.data[...] = (p.data + rng.normal(0, 0.2, p.shape)).astype(p.dtype)
    return model


def ids(b=4, t=7, seed=0):
    return np.random.default_rng(seed).integers(0, TINY["vocab_size"], (b, t))


def logits(model, x, **kw):
    return _np(model(x, **kw)[0].data)


def two_adapters(targets=("q_proj", "v_proj"), r2=2):
    peft = get_peft_model(gpt(), LoraConfig(r=2, init_lora_weights=False, target_modules=targets))
    peft.add_adapter("other", LoraConfig(r=r2, lora_alpha=4, init_lora_weights=False, target_modules=targets), seed=1)
    return peft


def trainable(peft):
    return sorted(n for n, p in peft.base_model.named_parameters() if p.requires_grad)


# ==== the adapter API ==========================================================================
def test_add_set_delete_adapter_as_peft_documents():
    peft = two_adapters()
    assert peft.active_adapter == "default" and list(peft.peft_config) == ["default", "other"]
    assert all(".default." in n for n in trainable(peft))  # the new adapter starts frozen
    x = ids()
    out_default = logits(peft, x)
    peft.set_adapter("other")
    assert peft.active_adapter == "other" and all(".other." in n for n in trainable(peft))
    out_other = logits(peft, x)
    assert np.abs(out_other - out_default).max() > 1e-3
    with pytest.raises(ValueError, match="not found"):
        peft.set_adapter("nope")
    with pytest.raises(ValueError, match="already exists"):
        peft.add_adapter("other", LoraConfig(r=2))
    with pytest.warns(UserWarning, match="Setting active adapter to default"):
        peft.delete_adapter("other")
    assert peft.active_adapter == "default" and list(peft.peft_config) == ["default"]
    np.testing.assert_array_equal(logits(peft, x), out_default)
    assert not any(".other." in n for n, _ in peft.base_model.named_parameters())
    with pytest.raises(ValueError, match="does not exist"):
        peft.delete_adapter("other")


def test_set_adapter_unmerges_and_delete_refuses_a_merged_adapter():
    peft = two_adapters()
    peft.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        peft.delete_adapter("default")
    with pytest.warns(UserWarning, match="Unmerging"):
        peft.set_adapter("other")
    assert not any(layer.merged for _, layer in peft.lora_layers())


def test_disable_adapter_runs_the_base():
    base_out = logits(gpt(), ids())
    peft = two_adapters()
    with peft.disable_adapter():
        np.testing.assert_allclose(logits(peft, ids()), base_out, rtol=1e-6, atol=1e-6)
    assert np.abs(logits(peft, ids()) - base_out).max() > 1e-3


def test_mixed_batch_equals_per_row_runs():
    peft = two_adapters(targets=("q_proj", "v_proj", "wte", "fc1"))
    x = ids(b=5)
    names = ["other", "__base__", "default", "other", "default"]
    mixed = logits(peft, x, adapter_names=names)
    for row, name in enumerate(names):
        if name == "__base__":
            with peft.disable_adapter():
                alone = logits(peft, x[row:row + 1])
        else:
            peft.set_adapter(name)
            alone = logits(peft, x[row:row + 1])
        np.testing.assert_allclose(mixed[row:row + 1], alone, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="entries for a batch"):
        peft(x, adapter_names=["default"])
    with pytest.raises(ValueError, match="unknown"):
        peft(x, adapter_names=["x"] * 5)


def test_mixed_batch_refuses_dora_and_merged():
    peft = get_peft_model(gpt(), LoraConfig(r=2, use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        peft(ids(b=2), adapter_names=["default", "__base__"])
    peft = two_adapters()
    peft.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        peft(ids(b=2), adapter_names=["default", "other"])


# ==== add_weighted_adapter ======================================================================
def deltas(peft, name):
    return {path: layer.delta_weight(name).astype(np.float64) for path, layer in peft.lora_layers() if name in layer.r}


def test_cat_is_exactly_the_weighted_sum():
    peft = two_adapters(r2=3)
    w = [0.7, -1.3]
    peft.add_weighted_adapter(["default", "other"], w, "mix", combination_type="cat")
    config = peft.peft_config["mix"]
    assert config.r == 5 and config.lora_alpha == 5  # PEFT: rank Σ r_i, lora_alpha = rank, s = 1
    d0, d1, mix = deltas(peft, "default"), deltas(peft, "other"), deltas(peft, "mix")
    for path in mix:
        np.testing.assert_allclose(mix[path], w[0] * d0[path] + w[1] * d1[path], rtol=1e-5, atol=1e-6)


def test_linear_sums_factors_so_cross_terms_appear():
    peft = two_adapters()
    w = [0.5, 2.0]
    peft.add_weighted_adapter(["default", "other"], w, "lin", combination_type="linear")
    assert peft.peft_config["lin"].r == 2 and peft.peft_config["lin"].lora_alpha == 2
    for path, layer in peft.lora_layers():
        (A0, B0), (A1, B1) = layer.factors("default"), layer.factors("other")
        s0, s1 = layer.scaling["default"], layer.scaling["other"]
        A = np.sqrt(w[0] * s0) * A0 + np.sqrt(w[1] * s1) * A1
        B = np.sqrt(w[0] * s0) * B0 + np.sqrt(w[1] * s1) * B1
        np.testing.assert_allclose(layer.delta_weight("lin"), B @ A, rtol=1e-5, atol=1e-6)
        exact = w[0] * s0 * B0 @ A0 + w[1] * s1 * B1 @ A1
        assert np.abs(B @ A - exact).max() > 1e-3  # the cross terms B_i A_j
    with pytest.raises(ValueError, match="same r"):
        two_adapters(r2=3).add_weighted_adapter(["default", "other"], w, "x", combination_type="linear")


def test_linear_negative_weight_puts_the_sign_on_A():
    peft = two_adapters()
    peft.add_weighted_adapter(["default"], [-2.0], "neg", combination_type="svd")  # one adapter: linear
    for _, layer in peft.lora_layers():
        np.testing.assert_allclose(layer.delta_weight("neg"), -2.0 * layer.delta_weight("default"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("svd_rank", [None, 1])
def test_svd_is_the_best_rank_r_approximation(svd_rank):
    peft = two_adapters(r2=3)
    w = [1.0, 0.6]
    peft.add_weighted_adapter(["default", "other"], w, "svd", combination_type="svd", svd_rank=svd_rank)
    k = svd_rank or 3
    assert peft.peft_config["svd"].r == k
    d0, d1, new = deltas(peft, "default"), deltas(peft, "other"), deltas(peft, "svd")
    for path in new:
        U, S, Vt = np.linalg.svd(w[0] * d0[path] + w[1] * d1[path])
        np.testing.assert_allclose(new[path], (U[:, :k] * S[:k]) @ Vt[:k], rtol=1e-4, atol=1e-5)


def test_weighted_adapter_existing_name_and_unknown_adapter():
    peft = two_adapters()
    before = deltas(peft, "other")
    peft.add_weighted_adapter(["default"], [3.0], "other")  # PEFT: an existing name is left alone
    after = deltas(peft, "other")
    assert all(np.array_equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="does not exist"):
        peft.add_weighted_adapter(["nope"], [1.0], "x")


# ==== LoRA+ =====================================================================================
def test_loraplus_groups_and_rates():
    peft = get_peft_model(gpt(), LoraConfig(r=2, target_modules=("q_proj", "wte"), use_dora=False, bias="all"))
    opt = create_loraplus_optimizer(peft, AdamW, lr=1e-3, loraplus_lr_ratio=16, weight_decay=0.1)
    names = {id(p): n for n, p in peft.named_parameters()}
    groups = [sorted(names[id(p)] for p in g["params"]) for g in opt.param_groups]
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-6, 1.6e-2, 1.6e-2]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.0, 0.0, 0.0]
    assert all("lora_A" in n for n in groups[0]) and groups[0]
    assert all("lora_embedding" in n for n in groups[1]) and len(groups[1]) == 2
    assert all("lora_B" in n for n in groups[2]) and groups[2]
    assert groups[3] and all(n.endswith("bias") for n in groups[3])
    peft2 = get_peft_model(gpt(), LoraConfig(r=2, use_dora=True))
    opt2 = create_loraplus_optimizer(peft2, SGD, lr=0.1, loraplus_lr_ratio=4, loraplus_weight_decay=0.01)
    mags = [p for p in opt2.param_groups[2]["params"] if p.ndim == 1]
    assert len(mags) == 4 and opt2.param_groups[2]["lr"] == 0.4 and opt2.param_groups[2]["weight_decay"] == 0.01


# ==== LoRA on an Embedding =====================================================================
def emb_layer(init=True, dtype="float64"):
    rng = np.random.default_rng(0)
    return LoraEmbedding(Embedding(11, 6, rng).to(dtype), LoraConfig(r=3, lora_alpha=6, init_lora_weights=init), rng).to(dtype)


def test_embedding_lora_init_shapes_and_formula():
    layer = emb_layer()
    A, B = (_np(a) for a in layer.factors("default"))
    assert A.shape == (3, 11) and B.shape == (6, 3) and np.all(A == 0) and abs(B.std() - 1) < 0.5
    layer.lora_embedding_A["default"].data[...] = np.random.default_rng(1).standard_normal((3, 11))
    A = _np(layer.factors("default")[0])
    x = np.array([[1, 4, 4, 10]])
    W = _np(layer.base_layer.weight.data)
    np.testing.assert_allclose(_np(layer(x).data), (W + (B @ A).T * 2.0)[x], rtol=1e-12)
    np.testing.assert_allclose(layer.delta_weight(), (B @ A).T * 2.0, rtol=1e-12)


def test_embedding_lora_merge_unmerge_and_gradcheck():
    layer = emb_layer(init=False)
    x = np.array([[0, 3, 3], [7, 10, 1]])
    before, W0 = _np(layer(x).data), _np(layer.base_layer.weight.data).copy()
    layer.merge()
    np.testing.assert_allclose(_np(layer(x).data), before, rtol=1e-12)
    layer.unmerge()
    np.testing.assert_allclose(_np(layer.base_layer.weight.data), W0, rtol=1e-13, atol=1e-14)
    assert gradcheck(lambda A, B: layer(x), [layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]])


def test_embedding_dora_refused_clearly():
    with pytest.raises(ValueError, match="Embedding"):
        get_peft_model(gpt(), LoraConfig(target_modules=("wte",), use_dora=True))


# ==== configs and misuse (issue 9) =============================================================
@pytest.mark.parametrize("kwargs, match", [
    (dict(use_rslora="false"), "use_rslora"), (dict(use_dora=1), "use_dora"),
    (dict(lora_alpha=float("inf")), "lora_alpha"), (dict(lora_dropout=float("nan")), "lora_dropout"),
    (dict(target_modules="q_proj(["), "regular expression"), (dict(target_modules=[3]), "target_modules"),
    (dict(task_type="CLS"), "task_type"), (dict(bias=None), "bias"),
])
def test_config_refuses_bad_types(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        LoraConfig(**kwargs)


def test_config_accepts_numpy_ints_and_a_bare_module_name():
    config = LoraConfig(r=np.int64(4), lora_alpha=np.float32(8), modules_to_save="score")
    assert config.r == 4 and type(config.r) is int and config.modules_to_save == ("score",)
    assert type(config.lora_alpha) is float and json.dumps(config.to_dict())  # plain numbers: JSON-able


def test_get_peft_model_refuses_a_model_with_lora_layers():
    peft = get_peft_model(gpt(), LoraConfig(r=2, target_modules="all-linear"))
    with pytest.raises(ValueError, match="already holds LoRA"):
        get_peft_model(peft.base_model, LoraConfig(r=2, target_modules="all-linear"))
    with pytest.raises(ValueError, match="already holds LoRA"):
        get_peft_model(peft, LoraConfig(r=2))


def test_save_after_merge_and_unload_refuses(tmp_path):
    peft = get_peft_model(gpt(), LoraConfig(r=2))
    peft.save_pretrained(tmp_path / "good")
    peft.merge_and_unload()
    with pytest.raises(ValueError, match="no LoRA layers"):
        peft.save_pretrained(tmp_path / "good")
    assert (tmp_path / "good" / "adapter_model.safetensors").is_file()


def test_adapter_name_checked():
    with pytest.raises(ValueError, match="adapter name"):
        get_peft_model(gpt(), LoraConfig(r=2), adapter_name="a.b")
    with pytest.raises(ValueError, match="adapter name"):
        two_adapters().add_adapter("__base__", LoraConfig(r=2))
