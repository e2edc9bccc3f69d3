"""The thread pool of parallel.py: bands of rows give the plain one-band result, every row once.

Each op that runs in bands (linear, the LoRA linear, layer norm, GELU, attention) is run twice
on the same random inputs, float64 and float32: once as one band (the plain kernel on the whole
arrays) and once cut into three bands on three threads, with the thresholds lowered so that even
these small arrays are cut: outputs and gradients must be the same bits. Products are also cut
at real sizes, where their bands must give the whole product's bits (tests/test_determinism.py
trains whole models at one and two threads).
"""
import os
import threading

import numpy as np
import pytest

from lora_numpy import Tensor, parallel
from lora_numpy import functional as F

needs_pool = pytest.mark.skipif(parallel._blas is None,
                                reason="bands need control of OpenBLAS's threads")


@pytest.fixture
def bands(monkeypatch):
    """A function that runs ``fn`` with ``n`` threads and every array worth cutting."""
    monkeypatch.setattr(parallel, "MIN_ELEMENTS", 1)
    monkeypatch.setattr(parallel, "MIN_MULTIPLY_ADDS", 1)
    before = parallel.threads

    def run_with(n, fn):
        parallel.set_threads(n)
        try:
            return fn()
        finally:
            parallel.set_threads(before)
    return run_with


def forward_backward(op, arrays, seed=0):
    tensors = [Tensor(a, requires_grad=True) for a in arrays]
    out = op(*tensors)
    out.backward(np.random.default_rng(seed).standard_normal(out.shape).astype(out.dtype))
    return [out.data] + [t.grad for t in tensors]


OPS = {
    "linear": (lambda x, w, b: F.linear(x, w, b), [(5, 7, 6), (9, 6), (9,)]),
    "lora_linear": (lambda x, w, a, b: F.lora_linear(x, w, None, a, b, 2.0),
                    [(5, 7, 6), (9, 6), (3, 6), (9, 3)]),
    "layer_norm": (lambda x, w, b: F.layer_norm(x, w, b), [(5, 7, 16), (16,), (16,)]),
    "gelu": (F.gelu, [(7, 33)]),
    "attention": (F.scaled_dot_product_attention, [(5, 3, 8, 4)] * 3),
    "attention, not causal": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=False),
                              [(5, 3, 8, 4)] * 3),
}


@needs_pool
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", list(OPS))
def test_bands_give_the_one_band_result(bands, name, dtype):
    op, shapes = OPS[name]
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal(s).astype(dtype) for s in shapes]
    plain = bands(1, lambda: forward_backward(op, arrays))
    cut = bands(3, lambda: forward_backward(op, arrays))
    for a, b in zip(plain, cut):
        assert b.dtype == dtype
        np.testing.assert_array_equal(b, a)


@needs_pool
@pytest.mark.parametrize("n, k, m", [(2048, 128, 128), (2048, 128, 512), (2048, 512, 128), (2047, 384, 1536),
                                     (1000, 64, 96), (513, 256, 256)])
@pytest.mark.parametrize("transposed", [False, True])
def test_a_product_in_bands_is_the_whole_product_bit_for_bit(n, k, m, transposed):
    """Bands start at multiples of ROW_TILE rows, so each row keeps its place in BLAS's tiles;
    cut elsewhere, OpenBLAS's Haswell kernels give other last bits (the module's docstring)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((k, n) if transposed else (n, k), dtype=np.float32)
    a = a.T if transposed else a
    b = rng.standard_normal((k, m), dtype=np.float32)
    whole = a @ b
    for bands in (2, 3, 4):
        edges = parallel._cuts(n, bands, parallel.ROW_TILE)
        assert all(e % parallel.ROW_TILE == 0 for e in edges[:-1]) and edges[-1] == n
        cut = np.concatenate([a[lo:hi] @ b for lo, hi in zip(edges, edges[1:])])
        np.testing.assert_array_equal(cut, whole)


def test_cuts_are_as_even_as_the_tile_allows():
    assert parallel._cuts(2048, 2, 24) == [0, 1032, 2048]
    assert parallel._cuts(128, 2, 24) == [0, 72, 128]
    assert parallel._cuts(10, 2, 24) == [0, 0, 10]          # too few rows: the first band is empty
    assert parallel._cuts(7, 3, 1) == [0, 2, 5, 7]


@needs_pool
def test_every_row_is_visited_once_and_bands_run_on_other_threads(bands):
    visits = np.zeros((7, 2))
    seen_threads = set()

    def kernel(rows):
        seen_threads.add(threading.get_ident())
        rows += 1

    bands(3, lambda: parallel.over_rows(kernel, visits, align=1))  # 7 rows in 3 bands: 2, 3, 2
    np.testing.assert_array_equal(visits, 1)
    assert len(seen_threads) >= 2  # the caller and the pool (which may reuse one thread)


@needs_pool
def test_an_error_in_a_band_reaches_the_caller(bands):
    def kernel(rows):
        if rows[0, 0] > 0:  # only the second band fails
            raise ArithmeticError("band failed")

    with pytest.raises(ArithmeticError, match="band failed"):
        bands(2, lambda: parallel.over_rows(kernel, np.arange(4.0).reshape(4, 1), align=1))


@needs_pool
def test_blas_runs_one_thread_whatever_ran_before(bands):
    """No timer, no history: BLAS keeps one thread through bands, unsplit products, any count."""
    get_blas_threads = parallel._blas[0]
    a = np.ones((64, 64))
    seen = []
    for n in (1, 2, 3):
        bands(n, lambda: (parallel.matmul(a, a), seen.append(get_blas_threads())))
        seen.append(get_blas_threads())
    assert seen == [1] * 6


@needs_pool
@pytest.mark.parametrize("op", [F.layer_norm, F.gelu], ids=["layer_norm", "gelu"])
def test_a_fused_op_cuts_its_bands_by_tokens_not_by_sequences(bands, monkeypatch, op):
    """16 sequences of 128 tokens (the benchmark's medium batch): too few sequences for bands
    cut at ROW_TILE, so cut by sequences the op would run on one thread."""
    rows_per_band = []
    run_band = parallel._run_band
    monkeypatch.setattr(parallel, "_run_band",
                        lambda kernel, arrays: (rows_per_band.append(arrays[0].shape[0]),
                                                run_band(kernel, arrays)))
    x = Tensor(np.ones((16, 128, 8), dtype=np.float32), requires_grad=True)
    bands(2, lambda: op(x).backward(np.ones(x.shape, dtype=np.float32)))
    assert len(rows_per_band) == 4 and min(rows_per_band) >= 1000  # forward and backward, 2048 tokens


def test_an_array_with_fewer_rows_than_bands_makes_it_one_band(bands):
    seen = []
    bands(2, lambda: parallel.over_rows(lambda a, b: seen.append((a.shape, b.shape)),
                                        np.zeros((4, 3)), np.zeros((1, 3))))
    assert seen == [((4, 3), (1, 3))]


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_a_bad_thread_count_in_the_environment_is_named(monkeypatch, value):
    monkeypatch.setenv("LORA_NUMPY_THREADS", value)
    with pytest.raises(ValueError, match=f"LORA_NUMPY_THREADS='{value}'"):
        parallel._threads_from_environment()


def test_the_environment_sets_the_thread_count(monkeypatch):
    monkeypatch.setenv("LORA_NUMPY_THREADS", "3")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert parallel._threads_from_environment() == 3
    monkeypatch.delenv("LORA_NUMPY_THREADS")
    assert parallel._threads_from_environment() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2,1")  # OpenMP's nested form: the first level counts
    assert parallel._threads_from_environment() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")  # not ours to refuse: every CPU
    assert parallel._threads_from_environment() == (os.cpu_count() or 1)


@pytest.mark.parametrize("n", [0, 1.5, "2"])
def test_set_threads_refuses_a_non_count(n):
    with pytest.raises(ValueError, match="thread count"):
        parallel.set_threads(n)


@needs_pool
def test_an_op_inside_a_band_runs_whole_instead_of_waiting_forever(bands):
    inner_bands = []

    def inner(rows):
        inner_bands.append(rows.shape[0])

    def outer(rows):
        parallel.over_rows(inner, rows, align=1)  # every pool thread is busy with an outer band

    # In a thread of its own, so that a deadlock fails the test instead of hanging it.
    runner = threading.Thread(target=bands, args=(2, lambda: parallel.over_rows(outer, np.zeros((6, 1)), align=1)),
                              daemon=True)
    runner.start()
    runner.join(timeout=20)
    assert not runner.is_alive(), "an op inside a band waited forever for the pool"
    assert sorted(inner_bands) == [3, 3]  # each outer band ran the inner op as one band


@needs_pool
def test_a_forked_child_starts_a_pool_of_its_own(bands):
    import os
    import signal
    if not hasattr(os, "fork"):
        pytest.skip("no fork on this platform")

    def fork_while_the_pool_lives():
        parallel.over_rows(lambda rows: None, np.zeros((4, 1)))  # the parent's pool, now alive
        pid = os.fork()
        if pid == 0:  # the child: a band must run, not wait for the parent's threads
            signal.alarm(20)  # a child that hangs dies, so the test fails instead of hanging
            visits = np.zeros((4, 1))
            parallel.over_rows(lambda rows: rows.__iadd__(1), visits)
            os._exit(0 if visits.sum() == 4 else 1)
        return os.waitpid(pid, 0)[1]
    assert os.waitstatus_to_exitcode(bands(2, fork_while_the_pool_lives)) == 0
