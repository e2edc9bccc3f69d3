"""Tests for lora_numpy.optim: update rules (against torch.optim when torch is installed, and
against hand-written formulas always), parameter groups, state, clipping and schedules."""
import io
import json

import numpy as np
import pytest

from lora_numpy.optim import (SGD, AdamW, clip_grad_norm_, cosine_schedule,
                              param_groups_for_weight_decay, set_lr)
from lora_numpy.tensor import Tensor

SHAPES = [(4, 3), (3,), (2, 2, 2)]


def make_params(seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return [Tensor(rng.standard_normal(s).astype(dtype), requires_grad=True) for s in SHAPES]


def grad_sequence(steps, seed=1, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(s).astype(dtype) for s in SHAPES] for _ in range(steps)]


def run(optimizer, params, grads):
    for step_grads in grads:
        optimizer.zero_grad()
        for p, g in zip(params, step_grads):
            p.grad = g
        optimizer.step()


def groups(params, lr, weight_decay):
    """Two groups: the first with the defaults, the second with its own lr and no decay."""
    return [{"params": params[::2], "weight_decay": weight_decay},
            {"params": params[1::2], "lr": lr / 2, "weight_decay": 0.0}]


# ---- against torch.optim ----------------------------------------------------------------
@pytest.mark.parametrize("momentum,weight_decay,nesterov",
                         [(0.0, 0.0, False), (0.9, 0.01, False), (0.9, 0.01, True)])
def test_sgd_matches_torch(momentum, weight_decay, nesterov):
    torch = pytest.importorskip("torch", exc_type=ImportError)
    params, grads = make_params(), grad_sequence(10)
    theirs = [torch.tensor(p.data.copy(), requires_grad=True) for p in params]
    run(SGD(groups(params, 0.1, weight_decay), lr=0.1, momentum=momentum, nesterov=nesterov),
        params, grads)
    run(torch.optim.SGD(groups(theirs, 0.1, weight_decay), lr=0.1, momentum=momentum,
                        nesterov=nesterov), theirs, [[torch.tensor(g) for g in gs] for gs in grads])
    for p, q in zip(params, theirs):
        np.testing.assert_allclose(p.data, q.detach().numpy(), rtol=1e-12, atol=1e-12)


def test_adamw_matches_torch():
    torch = pytest.importorskip("torch", exc_type=ImportError)
    params, grads = make_params(), grad_sequence(10)
    theirs = [torch.tensor(p.data.copy(), requires_grad=True) for p in params]
    kwargs = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6)
    run(AdamW(groups(params, 0.01, 0.1), **kwargs), params, grads)
    run(torch.optim.AdamW(groups(theirs, 0.01, 0.1), **kwargs), theirs,
        [[torch.tensor(g) for g in gs] for gs in grads])
    for p, q in zip(params, theirs):
        np.testing.assert_allclose(p.data, q.detach().numpy(), rtol=1e-10, atol=1e-12)


def test_clip_grad_norm_matches_torch():
    torch = pytest.importorskip("torch", exc_type=ImportError)
    params, (grads,) = make_params(), grad_sequence(1)
    theirs = [torch.tensor(p.data.copy()) for p in params]
    for p, q, g in zip(params, theirs, grads):
        p.grad, q.grad = g, torch.tensor(g)
    ours = clip_grad_norm_(params, 0.5)
    assert ours == pytest.approx(float(torch.nn.utils.clip_grad_norm_(theirs, 0.5)), rel=1e-12)
    for p, q in zip(params, theirs):
        np.testing.assert_allclose(p.grad, q.grad.numpy(), rtol=1e-12)


# ---- against hand-written formulas -------------------------------------------------------
def test_adamw_matches_reference_formula():
    lr, (b1, b2), eps, wd = 0.01, (0.9, 0.999), 1e-8, 0.1
    params, grads = make_params(), grad_sequence(3)
    theta = [p.data.copy() for p in params]
    m = [np.zeros_like(t) for t in theta]
    v = [np.zeros_like(t) for t in theta]
    for t, step_grads in enumerate(grads, start=1):
        for i, g in enumerate(step_grads):
            theta[i] = theta[i] - lr * wd * theta[i]
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g ** 2
            m_hat, v_hat = m[i] / (1 - b1 ** t), v[i] / (1 - b2 ** t)
            theta[i] = theta[i] - lr * m_hat / (np.sqrt(v_hat) + eps)
    run(AdamW(params, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd), params, grads)
    for p, expected in zip(params, theta):
        np.testing.assert_allclose(p.data, expected, rtol=1e-12, atol=1e-14)


def test_sgd_nesterov_matches_reference_formula():
    lr, mu, wd = 0.1, 0.9, 0.01
    params, grads = make_params(), grad_sequence(3)
    theta = [p.data.copy() for p in params]
    buf = [None] * len(theta)
    for step_grads in grads:
        for i, g in enumerate(step_grads):
            g = g + wd * theta[i]
            buf[i] = g if buf[i] is None else mu * buf[i] + g
            theta[i] = theta[i] - lr * (g + mu * buf[i])
    run(SGD(params, lr=lr, momentum=mu, weight_decay=wd, nesterov=True), params, grads)
    for p, expected in zip(params, theta):
        np.testing.assert_allclose(p.data, expected, rtol=1e-12)


def test_param_groups_apply_their_own_lr_and_weight_decay():
    a, b = Tensor(np.ones(3), requires_grad=True), Tensor(np.ones(3), requires_grad=True)
    a.grad = b.grad = np.full(3, 2.0)
    SGD([{"params": [a]}, {"params": [b], "lr": 0.01, "weight_decay": 0.5}], lr=0.1).step()
    np.testing.assert_allclose(a.data, 1 - 0.1 * 2.0)
    np.testing.assert_allclose(b.data, 1 - 0.01 * (2.0 + 0.5 * 1))


def test_state_only_for_trainable_parameters_with_a_gradient():
    frozen = Tensor(np.ones((3, 3), np.float32))
    trained, no_grad_yet = make_params(dtype=np.float32)[:2], Tensor(np.ones(2, np.float32),
                                                                   requires_grad=True)
    frozen.grad = np.ones((3, 3), np.float32)  # even a stray gradient must not move it
    for p in trained:
        p.grad = np.ones(p.shape, np.float32)
    data = [p.data for p in trained]
    optimizer = AdamW([frozen, *trained, no_grad_yet], lr=0.1)
    optimizer.step()
    assert set(map(id, optimizer.state)) == set(map(id, trained))
    np.testing.assert_array_equal(frozen.data, 1.0)
    np.testing.assert_array_equal(no_grad_yet.data, 1.0)
    for p, d in zip(trained, data):
        assert p.data is d and p.data.dtype == np.float32  # updated in place, dtype kept
        assert optimizer.state[p]["exp_avg"].dtype == np.float32


@pytest.mark.parametrize("make", [lambda ps: SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1),
                                  lambda ps: AdamW(ps, lr=0.1)])
def test_step_never_modifies_a_shared_gradient(make):
    params = [Tensor(np.ones(4), requires_grad=True) for _ in range(2)]
    shared = np.arange(4.0)
    for _ in range(2):
        params[0].grad = params[1].grad = shared
        make(params).step()
    np.testing.assert_array_equal(shared, np.arange(4.0))


def test_weight_decay_groups_skip_1d_and_frozen():
    w, emb = Tensor(np.ones((2, 3)), requires_grad=True), Tensor(np.ones((5, 2)), requires_grad=True)
    bias, gain = Tensor(np.ones(3), requires_grad=True), Tensor(np.ones(3), requires_grad=True)
    frozen = Tensor(np.ones((3, 3)))
    named = [("w", w), ("bias", bias), ("emb", emb), ("ln.gain", gain), ("frozen", frozen)]
    decay, no_decay = param_groups_for_weight_decay(named, 0.1)
    assert decay["params"] == [w, emb] and decay["weight_decay"] == 0.1
    assert no_decay["params"] == [bias, gain] and no_decay["weight_decay"] == 0.0
    for p in (w, emb, bias, gain):
        p.grad = np.zeros(p.shape)  # a zero gradient leaves only the decay to move them
    AdamW([decay, no_decay], lr=0.5).step()
    np.testing.assert_allclose(w.data, 1 - 0.5 * 0.1)
    np.testing.assert_array_equal(bias.data, 1.0)


def test_clip_grad_norm():
    params, (grads,) = make_params(), grad_sequence(1)
    for p, g in zip(params, grads):
        p.grad = g
    total = np.linalg.norm(np.concatenate([g.ravel() for g in grads]))
    assert clip_grad_norm_(params, max_norm=1.0) == pytest.approx(total, rel=1e-12)
    np.testing.assert_allclose(np.linalg.norm(np.concatenate([p.grad.ravel() for p in params])),
                               1.0, rtol=1e-5)
    for p, g in zip(params, grads):
        assert p.grad is not g  # a new array ...
        np.testing.assert_allclose(p.grad, g / (total + 1e-6))  # ... and the original intact
    before = [p.grad for p in params]
    assert clip_grad_norm_(params, max_norm=10.0) == pytest.approx(1.0, rel=1e-5)
    assert all(p.grad is g for p, g in zip(params, before))  # under the limit: untouched


def test_cosine_schedule_key_steps():
    kwargs = dict(max_steps=110, base_lr=1.0, warmup_steps=10, min_lr=0.1)
    assert cosine_schedule(0, **kwargs) == pytest.approx(0.1)  # base_lr / warmup_steps
    assert cosine_schedule(9, **kwargs) == pytest.approx(1.0)  # last warmup step
    assert cosine_schedule(10, **kwargs) == pytest.approx(1.0)  # cosine starts at the peak
    assert cosine_schedule(60, **kwargs) == pytest.approx(0.55)  # midpoint: (base + min) / 2
    assert cosine_schedule(110, **kwargs) == pytest.approx(0.1)
    assert cosine_schedule(500, **kwargs) == pytest.approx(0.1)  # clamped
    assert cosine_schedule(0, max_steps=100, base_lr=3e-4) == pytest.approx(3e-4)  # no warmup
    with pytest.raises(ValueError):
        cosine_schedule(0, max_steps=10, base_lr=1.0, warmup_steps=20)


def test_set_lr_reaches_every_group():
    params = make_params()
    optimizer = AdamW(groups(params, 0.1, 0.0))
    set_lr(optimizer, 0.25)
    assert [group["lr"] for group in optimizer.param_groups] == [0.25, 0.25]


def npz_round_trip(state_dict):
    """What a checkpoint does: arrays into an .npz, scalars through JSON, no pickle."""
    buffer = io.BytesIO()
    np.savez(buffer, **state_dict["arrays"])
    buffer.seek(0)
    with np.load(buffer, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    return {"arrays": arrays, "scalars": json.loads(json.dumps(state_dict["scalars"]))}


@pytest.mark.parametrize("make", [lambda ps: SGD(groups(ps, 0.1, 0.01), lr=0.1, momentum=0.9),
                                  lambda ps: AdamW(groups(ps, 0.1, 0.01), lr=0.1)])
def test_state_dict_round_trip_reproduces_the_next_step(make):
    grads = grad_sequence(4, dtype=np.float32)
    params = make_params(dtype=np.float32)
    optimizer = make(params)
    run(optimizer, params, grads[:3])
    saved = optimizer.state_dict()
    snapshot = {k: v.copy() for k, v in saved["arrays"].items()}
    restored_params = [Tensor(p.data.copy(), requires_grad=True) for p in params]
    restored = make(restored_params)
    restored.load_state_dict(npz_round_trip(saved))
    run(optimizer, params, grads[3:])
    run(restored, restored_params, grads[3:])
    for p, q in zip(params, restored_params):
        np.testing.assert_array_equal(p.data, q.data)
    for k, v in saved["arrays"].items():  # the saved arrays are copies, not live buffers
        np.testing.assert_array_equal(v, snapshot[k])


def test_load_state_dict_rejects_a_different_model():
    saved = AdamW(make_params()).state_dict()
    with pytest.raises(ValueError, match="parameters"):
        AdamW(make_params()[:2]).load_state_dict(saved)
    with pytest.raises(ValueError, match="AdamW"):
        SGD(make_params(), lr=0.1).load_state_dict(saved)


def test_clear_errors():
    params = make_params()
    with pytest.raises(ValueError, match="lr must be >= 0"):
        SGD(params, lr=-0.1)
    with pytest.raises(ValueError, match="betas"):
        AdamW(params, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="did you freeze every parameter"):
        AdamW([Tensor(np.ones(3)), Tensor(np.ones((2, 2)))])
    with pytest.raises(ValueError, match="empty parameter list"):
        SGD([], lr=0.1)
    with pytest.raises(ValueError, match="unknown option"):
        AdamW([{"params": params, "learning_rate": 0.1}])
    with pytest.raises(ValueError, match="nesterov"):
        SGD(params, lr=0.1, nesterov=True)
    with pytest.raises(TypeError, match="single Tensor"):
        SGD(params[0], lr=0.1)


def test_zero_grad_clears_gradients():
    params = make_params()
    for p in params:
        p.grad = np.ones(p.shape)
    SGD(params, lr=0.1).zero_grad()
    assert all(p.grad is None for p in params)
