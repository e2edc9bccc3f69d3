"""The CuPy backend gives the same numbers as NumPy. Skipped without CuPy or without a GPU;
on a GPU machine the whole suite can also run under LORA_NUMPY_BACKEND=cupy."""
import numpy as np
import pytest

from lora_numpy import backend

cupy = pytest.importorskip("cupy")
try:
    if cupy.cuda.runtime.getDeviceCount() == 0:
        pytest.skip("no GPU visible", allow_module_level=True)
except Exception as err:  # CUDA driver missing
    pytest.skip(f"CUDA unusable: {err}", allow_module_level=True)


def _train_steps(backend_name):
    from lora_numpy.models import GPT, GPTConfig
    from lora_numpy.optim import AdamW
    from lora_numpy.peft import LoraConfig, get_peft_model

    previous = backend.name
    backend.set_backend(backend_name)
    try:
        model = get_peft_model(GPT(GPTConfig(vocab_size=15, block_size=16, n_layer=2, n_head=2, n_embd=32)),
                               LoraConfig(r=4, target_modules="all-linear", init_lora_weights="pissa"))
        optimizer = AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        rng = np.random.default_rng(0)
        losses = []
        for _ in range(5):
            x, y = rng.integers(0, 15, (4, 16)), rng.integers(0, 15, (4, 16))
            loss = model(x, y)[1]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses, {k: backend.to_numpy(v) for k, v in model.state_dict().items()}
    finally:
        backend.set_backend(previous)


def test_cupy_training_matches_numpy():
    losses_np, state_np = _train_steps("numpy")
    losses_cp, state_cp = _train_steps("cupy")
    np.testing.assert_allclose(losses_cp, losses_np, rtol=1e-4)
    for name in state_np:
        np.testing.assert_allclose(state_cp[name], state_np[name], rtol=1e-3, atol=1e-5)
