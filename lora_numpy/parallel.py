"""Floor 1: the work of an op split over the CPU cores, one band of rows per thread.

BLAS runs a matrix product on every core, but each NumPy ufunc (``exp``, ``tanh``, ``*``) runs
on one thread, so on a 2-core laptop the elementwise half of a training step leaves a core
idle. In a fused op (GELU, layer norm, attention) and in a matrix product every row of the
result is computed on its own. ``over_rows(kernel, *arrays)`` cuts the arrays into one band of
rows per thread and runs the same ``kernel`` on every band at once; NumPy releases the GIL
inside each pass over an array and each BLAS call, so the bands really do run side by side.
The result is the kernel's own result: with one thread it is the plain kernel on the whole
arrays, the reference that a test compares the bands against.

Who holds the cores: the bands, always. BLAS runs one thread, fixed at import, and each band
makes its own BLAS call (as PyTorch's ``set_num_threads`` owns its pool). A product in two
bands is as fast as in OpenBLAS's two threads (2048x384 @ 384x1536: 9.32 ms against 9.34 ms),
and BLAS's own threads would change the numbers: on some CPUs OpenBLAS's threads split a product
where its one-thread kernel would not (measured with its Haswell kernels, also used on AMD Zen:
the last bits of 44 of 60 product shapes differ between one and two BLAS threads). A number
must never depend on what ran before or how long it took, so nothing here switches on a timer.

Same bits for any thread count. A row of ``a @ b`` computed by one BLAS thread can still depend
on where the row sits in the call: OpenBLAS's Haswell kernels compute rows in tiles of 24, and
a row in another position of its tile gets other last bits. So bands of a product are cut at
multiples of ``ROW_TILE`` rows: every row keeps its place in its tile, and a product in bands
equals the whole product bit for bit (measured with OpenBLAS's Haswell, SkylakeX and
Sandybridge kernels; tests/test_parallel.py checks the kernel this machine runs). A product
only r columns wide (LoRA's ``x Aᵀ``) is never cut: in a band it can fall to OpenBLAS's
small-matrix kernels, which sum in another order. Elementwise bands can be cut anywhere. A
model trained with one thread and with two then ends with the same weights.

The thread count is ``LORA_NUMPY_THREADS``, else ``OMP_NUM_THREADS`` (its first level if it lists
several), else the number of CPUs; ``set_threads`` changes it and ``set_threads(1)`` turns bands
off. Where NumPy's BLAS cannot be told its thread count (not OpenBLAS) bands stay off and BLAS
keeps its own threading. CuPy's kernels already use the whole GPU: there a kernel runs once on
the whole arrays.
"""
from __future__ import annotations

import ctypes
import glob
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import backend

# A band must be worth waking a thread for (~60 µs): a fused op gets at least MIN_ELEMENTS of
# its largest array per band (~8 passes over 512 KiB: ~0.2 ms), a product MIN_MULTIPLY_ADDS
# (~0.3 ms of one core's sgemm). Smaller work runs as one band.
MIN_ELEMENTS = 1 << 17
MIN_MULTIPLY_ADDS = 1 << 24
# Bands of a product start at multiples of this many rows, so that every row keeps its place in
# BLAS's tiles (24 rows in OpenBLAS's Haswell kernels; its SkylakeX and Sandybridge kernels gave
# the same bits at any cut): the bands then give the whole product's bits.
ROW_TILE = 24


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


def _openblas_functions():
    """(get, set) of the number of threads of NumPy's OpenBLAS and its kernel's name, through
    ctypes, or None.

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
                core = getattr(library, f"{prefix}openblas_get_corename{suffix}", None)
                if get is not None and set_ is not None:
                    if core is not None:
                        core.restype = ctypes.c_char_p
                    return get, set_, core
    return None


_blas = _openblas_functions()
threads = 1  # bands per over_rows call; 1 turns the pool off (set below)
_pool: ThreadPoolExecutor | None = None
_in_band = threading.local()  # .active: this thread is running a band (bands do not split again)
if _blas is not None:
    _blas[1](1)  # for good: the bands own the cores (see the module's docstring)


def _forget_pool_after_fork() -> None:
    global _pool
    _pool = None  # a forked child has none of the parent's threads: start a new pool if needed


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def stop_pool() -> None:
    """End the bands' threads (the next split starts them again), e.g. before forking."""
    global _pool
    if _pool is not None:
        _pool.shutdown()
        _pool = None


def set_threads(n: int) -> None:
    """Split ops into ``n`` bands on ``n`` threads, each band with a one-thread BLAS call;
    ``set_threads(1)`` runs every op on the calling thread. Without control of BLAS's threads
    (not OpenBLAS) the pool stays off: n is taken as 1."""
    global threads
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"thread count must be an int >= 1, got {n!r}")
    if _blas is None:
        n = 1
    if n != threads:
        stop_pool()
    threads = n


set_threads(_threads_from_environment())


def blas_core() -> str | None:
    """The name of the kernel family OpenBLAS chose for this CPU ("Haswell", "SkylakeX", ...):
    another family sums some products in another order. None when BLAS is not OpenBLAS."""
    if _blas is None or _blas[2] is None:
        return None
    return _blas[2]().decode()


def bands_for(work: int, min_per_band: int | None = None) -> int:
    """How many bands ``work`` is worth: one per thread, each with at least ``min_per_band``
    (default ``MIN_ELEMENTS``)."""
    return max(1, min(threads, work // (min_per_band or MIN_ELEMENTS)))


def _cuts(rows: int, bands: int, align: int) -> list:
    """The ``bands + 1`` boundaries of ``rows`` rows in bands of about equal size, each boundary
    but the last a multiple of ``align`` (a band may be empty when rows < bands · align)."""
    return [min(rows, align * round(rows * i / (bands * align))) for i in range(bands)] + [rows]


def over_rows(kernel, *arrays, bands: int | None = None, align: int = ROW_TILE) -> None:
    """Run ``kernel(*bands)`` on bands of rows (the first axis) of ``arrays``, in parallel.

    Every array is cut into the same number of bands, each along its own first axis (so one
    call can split a (N, d) array by tokens and a (d_out, d) one by features), at multiples of
    ``align`` rows (``ROW_TILE``: a product's rows keep their place in BLAS's tiles; 1 where each
    first-axis entry is computed on its own, as attention's sequences). The kernel must treat
    each row on its own and write its results into arrays it was given (its return value is
    dropped). Arrays that are not cut (weights, masks) reach the kernel through its closure.
    ``bands`` defaults to ``bands_for`` the largest array's size; an array with fewer rows than
    bands (0-d, or a broadcast axis of 1) makes it one band.
    """
    global _pool
    if threads == 1:  # the pool is off: the plain kernel, nothing else
        kernel(*arrays)
        return
    bands = bands_for(max(a.size for a in arrays)) if bands is None else bands
    if (bands < 2 or backend.name != "numpy" or getattr(_in_band, "active", False)
            or any(a.ndim == 0 or a.shape[0] < bands for a in arrays)):
        kernel(*arrays)
        return
    if _pool is None:
        _pool = ThreadPoolExecutor(threads - 1, thread_name_prefix="lora_numpy")
    edges = [_cuts(a.shape[0], bands, align) for a in arrays]
    cuts = [[a[e[i]:e[i + 1]] for a, e in zip(arrays, edges)] for i in range(bands)]
    cuts = [band for band in cuts if any(part.shape[0] for part in band)]
    # The calling thread takes the first band itself instead of sleeping until the others end.
    others = [_pool.submit(_run_band, kernel, band) for band in cuts[1:]]
    try:
        _run_band(kernel, cuts[0])
    finally:
        for future in others:
            future.result()  # re-raises a band's exception here


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
