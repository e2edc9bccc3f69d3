"""The command line refuses bad flags before any work, holds one run per output folder, and
turns operating-system errors and a closed pipe into one quiet line. (Each bad flag is a row of
tests/test_bad_inputs.py; here: timing, the lock, runtime errors and the pipe.)"""
import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_numpy import cli
from lora_numpy.io import save_json

ROOT = Path(__file__).resolve().parents[1]


class Reached(Exception):
    """Raised by a stand-in for the command's work: the checks let the command through."""


def reached(*args, **kwargs):
    raise Reached


def patch_work(monkeypatch, work=reached):
    for name in ("pretrain", "compare", "lowdata", "rank_study", "memory_study", "forgetting_study",
                 "variance_study", "budget_study"):
        monkeypatch.setattr(cli, name, work)


def compare_argv(tmp_path, *extra):
    return ["compare", "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"), "--quiet", *extra]


def test_rank_zero_fails_before_any_training_in_well_under_a_second(tmp_path, monkeypatch, capsys):
    patch_work(monkeypatch)  # reaching pretraining or fine-tuning would raise Reached
    start = time.perf_counter()
    code = cli.main(compare_argv(tmp_path, "--rank", "0"))
    seconds = time.perf_counter() - start
    assert code == 2 and "error: --rank must be >= 1, got 0" in capsys.readouterr().err
    assert seconds < 1.0, f"the check took {seconds:.2f}s"


@pytest.mark.parametrize("argv", [
    ["--target-modules", "q_proj", "v_proj", "--rank", "4"],
    ["--target", "sum", "--methods", "lora", "pissa", "--rank", "64"],
    ["--study", "rank", "--seeds", "0", "--lr-lora", "0.01"],
])
def test_good_compare_flags_pass_the_checks_quickly(argv, tmp_path, monkeypatch):
    patch_work(monkeypatch)
    start = time.perf_counter()
    with pytest.raises(Reached):
        cli.main(compare_argv(tmp_path, *argv))
    assert time.perf_counter() - start < 1.0
    assert not (tmp_path / ".out.lock").exists(), "the lock outlives the run"


def test_good_pretrain_flags_pass_the_checks(tmp_path, monkeypatch):
    patch_work(monkeypatch)
    (tmp_path / "corpus.txt").write_text("héllo wörld, " * 200, encoding="utf-8")
    save_json(tmp_path / "out" / "config.json", {})  # an earlier save may be replaced
    with pytest.raises(Reached):
        cli.main(["pretrain", "--task", "text", "--text-file", str(tmp_path / "corpus.txt"),
                  "--out", str(tmp_path / "out"), "--quiet"])


# ---- one run per --out ---------------------------------------------------------------------------
def test_a_second_run_into_a_busy_folder_refuses(tmp_path, monkeypatch, capsys):
    """The first run is another process, alive, holding the lock as the CLI writes it."""
    patch_work(monkeypatch)
    first = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".out.lock").write_text(f"{first.pid}\n")
        assert cli.main(compare_argv(tmp_path)) == 2
        err = capsys.readouterr().err
        assert f"is in use by another run (pid {first.pid}" in err and "Traceback" not in err
        assert (tmp_path / ".out.lock").read_text() == f"{first.pid}\n", "the other run's lock was touched"
    finally:
        first.kill()
        first.wait()
    # its process gone, the lock is stale: the next run takes it over, and removes it at the end
    with pytest.raises(Reached):
        cli.main(compare_argv(tmp_path))
    assert not (tmp_path / ".out.lock").exists()


def test_the_lock_holds_the_pid_during_the_run_and_goes_after_an_error(tmp_path, monkeypatch, capsys):
    seen = []

    def work(*args, **kwargs):
        seen.append((tmp_path / ".out.lock").read_text())
        raise ValueError("diverged")
    patch_work(monkeypatch, work)
    assert cli.main(compare_argv(tmp_path)) == 2
    assert seen == [f"{os.getpid()}\n"]
    assert "error: diverged" in capsys.readouterr().err
    assert not (tmp_path / ".out.lock").exists()


def test_two_real_runs_one_refuses(tmp_path):
    """Two processes start `pretrain` into one folder at once; the work is slowed so they
    overlap. Exactly one refuses, naming the lock, and the other saves."""
    script = ("import sys, time; from lora_numpy import cli; real = cli.pretrain\n"
              "def slow(*a, **k):\n    time.sleep(3)\n    return real(*a, **k)\n"
              "cli.pretrain = slow; sys.exit(cli.main(sys.argv[1:]))")
    argv = ["pretrain", "--steps", "1", "--batch-size", "2", "--n-layer", "1", "--n-head", "1",
            "--n-embd", "8", "--out", str(tmp_path / "base"), "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen([sys.executable, "-c", script, *argv], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in runs]
    for p in runs:
        p.stdout.close()
        p.stderr.close()
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    assert "in use by another run" in next(err for code, err in results if code == 2)
    assert (tmp_path / "base" / "model.npz").is_file() and not (tmp_path / ".base.lock").exists()


# ---- errors from the operating system, and a closed pipe -----------------------------------------
def test_an_os_error_during_the_run_is_one_line_with_the_path_and_a_fix(tmp_path, monkeypatch, capsys):
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "out" / "results.json"))
    patch_work(monkeypatch, disk_full)
    assert cli.main(compare_argv(tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"results.json: {os.strerror(errno.ENOSPC)}; free some disk space" in err


def test_a_file_in_the_way_during_the_run_is_one_line(tmp_path, monkeypatch, capsys):
    """A real failing write: the run saves under a path where a file already stands."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "rank").write_text("a file where the study's folder goes")
    patch_work(monkeypatch, lambda *a, **k: save_json(tmp_path / "out" / "rank" / "results.json", {}))
    assert cli.main(compare_argv(tmp_path, "--study", "rank")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "rank" in err and "choose another path" in err


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write anywhere")
def test_a_read_only_out_is_refused_before_the_run(tmp_path, monkeypatch, capsys):
    patch_work(monkeypatch)
    (tmp_path / "out").mkdir()
    (tmp_path / "out").chmod(0o500)
    try:
        assert cli.main(compare_argv(tmp_path)) == 2
    finally:
        (tmp_path / "out").chmod(0o700)
    assert "is not writable" in capsys.readouterr().err


def test_a_closed_pipe_ends_quietly(tmp_path):
    """`python -m lora_numpy pretrain ... | head -0`: the reader is gone before anything is
    printed, so every write fails with EPIPE; the run ends with 141 (128 + SIGPIPE, what a
    shell reports for a process stopped by a closed pipe) and no traceback."""
    run = subprocess.Popen(
        [sys.executable, "-m", "lora_numpy", "pretrain", "--steps", "1", "--batch-size", "2",
         "--n-layer", "1", "--n-head", "1", "--n-embd", "8", "--out", str(tmp_path / "base"), "--quiet"],
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    run.stdout.close()  # the reader leaves at once
    err = run.stderr.read().decode()
    run.stderr.close()
    assert run.wait(timeout=120) == 141, err
    assert err == "", err
    assert (tmp_path / "base" / "model.npz").is_file()  # the work itself was done and saved
