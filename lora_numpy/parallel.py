"""Floor 1: the work of an op split over the CPU cores, one band of rows per thread.

BLAS runs a matrix product on every core, but each NumPy ufunc (``exp``, ``tanh``, ``*``) runs
on one thread, so on a 2-core laptop the elementwise half of a training step leaves a core
idle. In a fused op (GELU, layer norm, attention) and in a matrix product every row of the
result is computed on its own. ``over_rows(kernel, *arrays)`` cuts the arrays into one band of
rows per thread and runs the same ``kernel`` on every band at once; NumPy releases the GIL
inside each pass over an array and each BLAS call, so the bands really do run side by side.
The result is the kernel's own result: with one thread it is the plain kernel on the whole
arrays, the reference that a test compares the bands against.

Who holds the cores. After each product OpenBLAS's worker threads spin for about 2^28 cycles
(~0.1 s), waiting for the next one, so a band started then finds its core busy and wins nothing
(measured: a training step as fast with two bands as with one). So while bands run, BLAS runs
on one thread and each band makes its own BLAS call, as PyTorch's ``set_num_threads`` owns its
pool; a product in two bands is as fast as in OpenBLAS's two threads (2048x384 @ 384x1536:
9.32 ms against 9.34 ms). But waking a sleeping thread of ours costs ~60 µs where OpenBLAS's
spinning ones answer at once, so small work stays in one band, and once no op has been split
for ``HAND_BACK_SECONDS`` BLAS gets its threads back: a tiny model (every op small) then runs
as if this module did not exist. Switching on every op instead is a disaster (a LoRA step 1.6x
slower: the spinning threads of one small product slow every band after it).

The thread count is ``LORA_NUMPY_THREADS``, else ``OMP_NUM_THREADS`` (the budget BLAS gets; its
first level if it lists several), else the number of CPUs; ``set_threads`` changes it and
``set_threads(1)`` turns bands off. Where NumPy's BLAS cannot be told its thread count (not
OpenBLAS) bands stay off too. CuPy's kernels already use the whole GPU: there a kernel runs
once on the whole arrays.
"""
from __future__ import annotations

import ctypes
import glob
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import backend

# A band must be worth waking a thread for (~60 µs): a fused op gets at least MIN_ELEMENTS of
# its largest array per band (~8 passes over 512 KiB: ~0.2 ms), a product MIN_MULTIPLY_ADDS
# (~0.3 ms of one core's sgemm). Smaller work runs as one band: splitting also takes BLAS's
# threads away from the ops around it (see above), so a band must pay for more than its wake-up.
MIN_ELEMENTS = 1 << 17
MIN_MULTIPLY_ADDS = 1 << 24
HAND_BACK_SECONDS = 0.1  # no op split for this long: BLAS gets its own threads back


def _threads_from_environment() -> int:
    value = os.environ.get("LORA_NUMPY_THREADS", "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"LORA_NUMPY_THREADS={value!r} must be a whole number of threads >= 1 "
                             "(unset it to use every CPU)")
        return int(value)
    # OpenMP's own variable may list nested levels ("4,2"): its first level is BLAS's budget.
    omp = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if omp.isdigit() and int(omp) >= 1:
        return int(omp)
    return os.cpu_count() or 1


def _openblas_thread_functions():
    """(get, set) of the number of threads of NumPy's OpenBLAS, through ctypes, or None.

    NumPy's wheels load OpenBLAS under a prefixed, suffixed name (``scipy_openblas64_``); the
    library is found among the files this process has mapped (Linux) or next to NumPy."""
    paths = []
    if os.path.exists("/proc/self/maps"):
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "openblas" in line.lower()})
    root = os.path.dirname(np.__file__)
    paths += glob.glob(os.path.join(root, ".dylibs", "*openblas*")) + glob.glob(
        os.path.join(root + ".libs", "*openblas*"))
    for path in paths:
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("scipy_", ""):
            for suffix in ("64_", ""):
                get = getattr(library, f"{prefix}openblas_get_num_threads{suffix}", None)
                set_ = getattr(library, f"{prefix}openblas_set_num_threads{suffix}", None)
                if get is not None and set_ is not None:
                    return get, set_
    return None


_blas = _openblas_thread_functions()
_blas_own_threads = _blas[0]() if _blas else None  # what BLAS had before the pool took over
_blas_threads_now = None
_last_split = -float("inf")  # time.perf_counter() of the last op run in bands
threads = 1  # bands per over_rows call; 1 turns the pool off (set below)
_pool: ThreadPoolExecutor | None = None
_in_band = threading.local()  # .active: this thread is running a band (bands do not split again)


def _set_blas_threads(n) -> None:
    global _blas_threads_now
    if _blas is not None and n != _blas_threads_now:
        _blas[1](n)
        _blas_threads_now = n


def _forget_pool_after_fork() -> None:
    global _pool
    _pool = None  # a forked child has none of the parent's threads: start a new pool if needed


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def set_threads(n: int) -> None:
    """Split ops into ``n`` bands on ``n`` threads; with n > 1 BLAS runs one thread per band.
    ``set_threads(1)`` runs every op on the calling thread and gives BLAS its threads back.
    Without control of BLAS's threads (not OpenBLAS) the pool stays off: n is taken as 1."""
    global threads, _pool
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"thread count must be an int >= 1, got {n!r}")
    if _blas is None:
        n = 1
    if _pool is not None and n != threads:
        _pool.shutdown()
        _pool = None
    threads = n
    _set_blas_threads(_blas_own_threads)  # until an op is split


set_threads(_threads_from_environment())


def bands_for(work: int, min_per_band: int | None = None) -> int:
    """How many bands ``work`` is worth: one per thread, each with at least ``min_per_band``
    (default ``MIN_ELEMENTS``)."""
    return max(1, min(threads, work // (min_per_band or MIN_ELEMENTS)))


def over_rows(kernel, *arrays, bands: int | None = None) -> None:
    """Run ``kernel(*bands)`` on bands of rows (the first axis) of ``arrays``, in parallel.

    Every array is cut into the same number of bands, each along its own first axis (so one
    call can split a (N, d) array by tokens and a (d_out, d) one by features). The kernel must
    treat each row on its own and write its results into arrays it was given (its return value
    is dropped). Arrays that are not cut (weights, masks) reach the kernel through its closure.
    ``bands`` defaults to ``bands_for`` the largest array's size; an array with fewer rows than
    bands (0-d, or a broadcast axis of 1) makes it one band.
    """
    global _pool, _last_split
    if threads == 1:  # the pool is off: the plain kernel, nothing else
        kernel(*arrays)
        return
    bands = bands_for(max(a.size for a in arrays)) if bands is None else bands
    if (bands < 2 or backend.name != "numpy" or getattr(_in_band, "active", False)
            or any(a.ndim == 0 or a.shape[0] < bands for a in arrays)):
        _hand_back_if_idle()
        kernel(*arrays)
        return
    _last_split = time.perf_counter()
    _set_blas_threads(1)
    if _pool is None:
        _pool = ThreadPoolExecutor(threads - 1, thread_name_prefix="lora_numpy")
    cuts = [[a[a.shape[0] * i // bands:a.shape[0] * (i + 1) // bands] for a in arrays]
            for i in range(bands)]
    # The calling thread takes the first band itself instead of sleeping until the others end.
    others = [_pool.submit(_run_band, kernel, band) for band in cuts[1:]]
    try:
        _run_band(kernel, cuts[0])
    finally:
        for future in others:
            future.result()  # re-raises a band's exception here


def _hand_back_if_idle() -> None:
    if _blas_threads_now != _blas_own_threads and time.perf_counter() - _last_split > HAND_BACK_SECONDS:
        _set_blas_threads(_blas_own_threads)


def _run_band(kernel, arrays) -> None:
    """Run one band; an op called inside it runs whole (waiting for bands of its own, a pool
    thread could wait forever for threads that are all busy waiting too)."""
    _in_band.active = True
    try:
        kernel(*arrays)
    finally:
        _in_band.active = False


def matmul(a, b, bias=None):
    """``a @ b (+ bias)`` with the rows of ``a`` in bands; a (n, k), b (k, m), bias (m,) -> (n, m).

    Row i of the product is row i of ``a`` times ``b``, so each band is one BLAS call."""
    bands = bands_for(a.shape[0] * a.shape[1] * b.shape[1], MIN_MULTIPLY_ADDS)
    if bands < 2:  # the common small case, without the bands' bookkeeping
        _hand_back_if_idle()
        out = a @ b
        if bias is not None:
            out += bias
        return out
    out = backend.xp.empty((a.shape[0], b.shape[1]), dtype=np.result_type(a.dtype, b.dtype))

    def band(a, out):
        backend.xp.matmul(a, b, out=out)
        if bias is not None:
            out += bias
    over_rows(band, a, out, bands=bands)
    return out
