"""Floor 8: the independent runs of an experiment, spread over the CPU cores.

An experiment is many runs that do not talk to each other: bases to pretrain, then fine-tuning
runs on them. Each is a pure function of its description, computed on one thread, so its bits
are the same whether it runs alone or beside others, and whatever ran before it. A small model
keeps one core busy and cannot use a second (its ops are too small to split), so the cores
serve best as one run each: ``run_all`` runs the jobs in ``parallel.threads`` worker processes
forked from this one (in this process when that is 1, on CuPy, where the GPU is one device,
and where the system cannot fork: a spawned worker would re-run the caller's script).

A job that needs another's output (a fine-tuning run needs its base) names it in ``after`` and
starts as soon as that one is done. Progress goes to stderr, one line per finished job; the
results come back keyed as the jobs were, in no order that depends on timing.
"""
from __future__ import annotations

import multiprocessing
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, Hashable

from .. import backend, parallel


@dataclass(frozen=True)
class Job:
    label: str                    # what its progress line names
    fn: Callable                  # a module-level function (it travels to a worker by name)
    args: tuple = ()
    after: Hashable | None = None  # the key of a job that must finish first
    describe: Callable = str      # result -> the text of its progress line


class _InProcess:
    """The executor interface, run in this process, one job at a time."""

    def submit(self, fn, *args) -> Future:
        future = Future()
        future.set_result(fn(*args))
        return future

    def shutdown(self, cancel_futures: bool = False) -> None:
        pass


def _one_thread() -> None:
    parallel.set_threads(1)


def workers() -> int:
    """How many runs go at once: one per thread; one on CuPy or without fork."""
    if backend.name != "numpy" or "fork" not in multiprocessing.get_all_start_methods():
        return 1
    return parallel.threads


def _pool(n: int):
    if n == 1:
        return _InProcess()
    parallel.stop_pool()  # no thread of ours is copied into the workers mid-wait
    return ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("fork"), initializer=_one_thread)


def run_all(jobs: dict, progress: bool = True) -> dict:
    """Run every ``Job`` of ``jobs`` (key -> Job) and return key -> its function's result."""
    unknown = [key for key, job in jobs.items() if job.after is not None and job.after not in jobs]
    if unknown:
        raise ValueError(f"jobs {unknown} wait for jobs that are not in the list")
    results, waiting, running = {}, dict(jobs), {}
    n = workers()
    executor, start = _pool(n), time.perf_counter()

    def submit_ready():  # in the jobs' order, at most one per worker at a time
        for key, job in list(waiting.items()):
            if len(running) < n and (job.after is None or job.after in results):
                del waiting[key]
                running[executor.submit(job.fn, *job.args)] = key

    try:
        submit_ready()
        while running:
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in done:
                key = running.pop(future)
                results[key] = future.result()  # a job's error stops the experiment here
                if progress:
                    print(f"  [{len(results)}/{len(jobs)} in {time.perf_counter() - start:.0f}s] "
                          f"{jobs[key].label}: {jobs[key].describe(results[key])}", file=sys.stderr, flush=True)
            submit_ready()
    finally:
        executor.shutdown(cancel_futures=True)
    if waiting:
        raise ValueError(f"jobs {list(waiting)} wait for each other in a cycle")
    return results
