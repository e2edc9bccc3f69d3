"""A run is a pure function of its inputs, its seeds and its thread count (DESIGN §6): the same
training gives the same bits three times in one process and once in a fresh one, a resumed run
equals the uninterrupted one, and, as parallel.py arranges, one thread and two give the same
bits too, on this machine's BLAS kernel and on OpenBLAS's Haswell kernels (forced with
OPENBLAS_CORETYPE where this CPU can run them)."""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lora_numpy import parallel
from lora_numpy.models import GPT, GPTConfig
from lora_numpy.peft import LoraConfig, get_peft_model
from lora_numpy.train import TrainConfig, train

# (batch, context, width): the 8 x 32 batch of a 256-wide GPT, where two threads first split
# the MLP's products, and a 128-wide one whose every Linear is cut into bands
SHAPES = ((8, 32, 256), (16, 64, 128))
KINDS = ("full", "lora")
STEPS = 6


def _model(kind: str, shape):
    batch, context, width = shape
    model = GPT(GPTConfig(vocab_size=96, block_size=context, n_layer=2, n_head=4, n_embd=width,
                          dropout=0.1 if kind == "lora" else 0.0), seed=0)
    if kind == "lora":  # with LoRA's dropout, so the masks' generators are part of the state
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.1))
    return model


def _batches(shape):
    batch, context, _ = shape

    def batch_fn(rng):
        x = rng.integers(0, 96, (batch, context))
        return x, np.roll(x, -1, axis=1)
    return batch_fn


def digest(model) -> str:
    return hashlib.sha256(b"".join(np.ascontiguousarray(v).tobytes()
                                   for _, v in sorted(model.state_dict().items()))).hexdigest()[:16]


def trained(kind: str, shape, threads: int, **train_kwargs) -> str:
    """The digest of the weights after STEPS AdamW steps at ``threads`` threads."""
    before = parallel.threads
    parallel.set_threads(threads)
    try:
        model = _model(kind, shape)
        config = TrainConfig(steps=STEPS, batch_size=shape[0], lr=1e-3, warmup_steps=2, eval_every=0)
        train(model, _batches(shape), config, progress=False, **train_kwargs)
        if "stop_at" in train_kwargs:  # resume the rest from the checkpoint
            model = _model(kind, shape)
            train(model, _batches(shape), config, progress=False, resume=True,
                  checkpoint_dir=train_kwargs["checkpoint_dir"])
        return digest(model)
    finally:
        parallel.set_threads(before)


def _in_a_fresh_process(threads: int, coretype: str | None = None) -> dict:
    env = dict(os.environ, LORA_NUMPY_THREADS=str(threads))
    if coretype:
        env["OPENBLAS_CORETYPE"] = coretype
    out = subprocess.run([sys.executable, __file__, str(threads)], env=env, capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out)


needs_pool = pytest.mark.skipif(parallel._blas is None, reason="two threads need control of OpenBLAS's threads")


@needs_pool
def test_the_same_training_gives_the_same_bits_within_each_thread_count():
    for threads in (1, 2):
        fresh = _in_a_fresh_process(threads)
        for kind in KINDS:
            for shape in SHAPES:
                runs = [trained(kind, shape, threads) for _ in range(3)] + [fresh[f"{kind} {shape}"]]
                assert len(set(runs)) == 1, (kind, shape, threads, runs)


@needs_pool
def test_one_thread_and_two_give_the_same_bits():
    for kind in KINDS:
        for shape in SHAPES:
            assert trained(kind, shape, 1) == trained(kind, shape, 2), (kind, shape)


@needs_pool
def test_one_thread_and_two_agree_on_openblas_haswell_kernels_too():
    """OpenBLAS's Haswell kernels (also AMD Zen's) compute rows in tiles of 24: the kernel family
    whose bits move when a product is cut anywhere (parallel.ROW_TILE)."""
    one, two = _in_a_fresh_process(1, "Haswell"), _in_a_fresh_process(2, "Haswell")
    if one["blas_core"] != "Haswell":
        pytest.skip(f"this CPU or BLAS cannot run OpenBLAS's Haswell kernels (got {one['blas_core']})")
    assert {k: v for k, v in one.items()} == {k: v for k, v in two.items()}


@needs_pool
def test_a_run_resumed_at_two_threads_equals_the_uninterrupted_one(tmp_path):
    for kind in KINDS:
        shape = SHAPES[0]
        whole = trained(kind, shape, 2)
        assert trained(kind, shape, 2, stop_at=STEPS // 2, checkpoint_dir=tmp_path / kind) == whole, kind


if __name__ == "__main__":  # the fresh process of _in_a_fresh_process: every digest at argv[1] threads
    threads = int(sys.argv[1])
    print(json.dumps({"blas_core": parallel.blas_core(),
                      **{f"{kind} {shape}": trained(kind, shape, threads) for kind in KINDS for shape in SHAPES}}))
