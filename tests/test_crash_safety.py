"""Saves survive a crash: a process saving in a loop is killed with SIGKILL at random moments,
and every time the folder loads as exactly the previous save or the next one, never a mix; a
training run resumed from whatever the kill left equals an uninterrupted run. A write that
fails halfway leaves the previous file (or folder) as it was.

The saver is a forked child (no interpreter start-up per kill), so many kills fit in seconds.
"""
import copy
import os
import re
import shutil
import signal
import time
import traceback
from pathlib import Path

import numpy as np
import pytest

import lora_numpy
from lora_numpy import backend
from lora_numpy import io as lio
from lora_numpy.checkpoint import load_model, save_model, saved_train_config
from lora_numpy.models import GPT, GPTConfig
from lora_numpy.peft import LoraConfig, PeftModel, get_peft_model
from lora_numpy.train import TrainConfig, save_history_csv, train

KILLS = 20  # per kind of save
TINY = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8, dropout=0.1)

needs_fork = pytest.mark.skipif(not hasattr(os, "fork") or backend.name != "numpy",
                                reason="forks a saving child (POSIX, host arrays)")


def host(arrays: dict) -> dict:
    return {k: backend.to_numpy(v).copy() for k, v in arrays.items()}


def assert_same_arrays(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(backend.to_numpy(got[k]), want[k], err_msg=k)


def leftovers(folder) -> list:
    """Temporary or parked siblings of ``folder`` (what a kill mid-save leaves behind)."""
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


def kill_at_random(save_forever, rng, window_s: float) -> None:
    """Fork a child that runs ``save_forever()``; SIGKILL it after a random delay in
    [0, window_s). The child must still be saving when the kill lands (not crashed)."""
    pid = os.fork()
    if pid == 0:  # the child: save until killed; never return into pytest
        try:
            save_forever()
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(1)
    time.sleep(rng.uniform(0.0, window_s))
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status), "the saving child died before the kill (an error in it?)"


def time_one(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def perturbed_gpt(seed: int) -> GPT:
    model = GPT(TINY, seed=0)
    rng = np.random.default_rng(seed)
    for p in model.parameters():
        p.data[...] += backend.asarray(rng.standard_normal(p.shape).astype(p.dtype))
    return model


def run_kills(folder, save_one_of, check, rng, kills=KILLS) -> int:
    """Kill a child alternating between two saves ``kills`` times, checking the folder after
    each kill; return how many kills landed mid-save (left a temporary or parked folder)."""
    def save_forever():
        while True:
            save_one_of(0)
            save_one_of(1)
    window = 3 * time_one(lambda: save_one_of(0))
    mid_save = 0
    for _ in range(kills):
        kill_at_random(save_forever, rng, window)
        mid_save += bool(leftovers(folder)) or not folder.exists()
        check()
    return mid_save


@needs_fork
def test_model_checkpoint_survives_sigkill(tmp_path):
    """After each kill, load_model returns model A or model B whole: the config's version tag
    and every array belong to the same save."""
    models = [perturbed_gpt(1), perturbed_gpt(2)]
    expected = [host(m.state_dict()) for m in models]
    folder = tmp_path / "ckpt"

    def save_one_of(i):
        save_model(folder, models[i], {"version": i})

    def check():
        loaded, meta = load_model(folder)
        assert_same_arrays(loaded.state_dict(), expected[meta["version"]])

    save_one_of(0)
    mid_save = run_kills(folder, save_one_of, check, np.random.default_rng(0))
    assert mid_save > 0, "no kill landed during a save: the test would prove nothing"
    save_one_of(1)  # the next save removes what the kills left behind
    assert leftovers(folder) == []
    check()


@needs_fork
def test_adapter_survives_sigkill(tmp_path):
    """Two adapters of different ranks (2 and 4) alternate: a mix of one's config with the
    other's arrays could not load, and each load must equal one adapter exactly."""
    base = GPT(TINY, seed=0)
    adapters = []
    for seed, r in ((1, 2), (2, 4)):
        peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=4), seed=seed)
        for _, layer in peft.lora_layers():  # B = 0 at init: give it values a mix would show
            B = layer.lora_B["default"].weight
            B.data[...] = backend.asarray(
                np.random.default_rng(seed).standard_normal(B.shape).astype(np.float32))
        adapters.append(peft)
    expected = {a.active_peft_config.r: host(a.adapter_state_dict()) for a in adapters}
    folder = tmp_path / "adapter"

    def save_one_of(i):
        adapters[i].save_pretrained(folder)

    def check():
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), folder)
        assert_same_arrays(loaded.adapter_state_dict(), expected[loaded.active_peft_config.r])

    save_one_of(0)
    mid_save = run_kills(folder, save_one_of, check, np.random.default_rng(1))
    assert mid_save > 0
    save_one_of(1)
    assert leftovers(folder) == []
    check()


def lm_batch(rng):
    seq = rng.integers(0, TINY.vocab_size, size=(2, 7))
    return seq[:, :-1], seq[:, 1:]


def without_timings(state: dict) -> dict:
    """train_state.json minus the measured milliseconds, which differ between runs."""
    return {**state, "history": [{k: v for k, v in h.items() if k != "ms"} for h in state["history"]]}


@needs_fork
def test_training_state_survives_sigkill_and_resumes_exactly(tmp_path):
    """A child trains step by step, saving the whole state after each step (and starting over
    after the last). After each kill the folder equals the reference state of some step k
    (model, optimizer and train_state.json), and resuming from it ends bit for bit where an
    uninterrupted run ends."""
    steps = 4
    tc = TrainConfig(steps=steps, batch_size=2, lr=1e-2, warmup_steps=1, seed=3)
    uninterrupted = GPT(TINY, seed=0)
    train(uninterrupted, lm_batch, tc, progress=False)
    final = host(uninterrupted.state_dict())

    reference, ref_dir = {}, tmp_path / "reference"  # the saved state after each step
    for k in range(1, steps + 1):
        train(GPT(TINY, seed=0 if k == 1 else 7), lm_batch, tc, checkpoint_dir=ref_dir,
              resume=k > 1, stop_at=k, progress=False)
        reference[k] = (lio.load_arrays(ref_dir / "model.npz"), lio.load_arrays(ref_dir / "optimizer.npz"),
                        without_timings(lio.load_json(ref_dir / "train_state.json")))
    folder = tmp_path / "run"

    def one_step():
        step, _ = saved_train_config(folder)
        if step >= steps:  # start over, so the child never runs out of saves to make
            train(GPT(TINY, seed=0), lm_batch, tc, checkpoint_dir=folder, stop_at=1, progress=False)
        else:  # a fresh model of another seed: everything must come from the folder
            train(GPT(TINY, seed=7), lm_batch, tc, checkpoint_dir=folder, resume=True,
                  stop_at=step + 1, progress=False)

    def check():
        step, _ = saved_train_config(folder)
        model, optimizer, state = reference[step]
        assert_same_arrays(lio.load_arrays(folder / "model.npz"), model)
        assert_same_arrays(lio.load_arrays(folder / "optimizer.npz"), optimizer)
        assert without_timings(lio.load_json(folder / "train_state.json")) == state
        copy_dir = tmp_path / "resumed"  # resume a copy: the original stays for the next child
        shutil.rmtree(copy_dir, ignore_errors=True)
        shutil.copytree(folder, copy_dir)
        resumed = GPT(TINY, seed=7)
        train(resumed, lm_batch, tc, checkpoint_dir=copy_dir, resume=True, progress=False)
        assert_same_arrays(resumed.state_dict(), final)

    train(GPT(TINY, seed=0), lm_batch, tc, checkpoint_dir=folder, stop_at=1, progress=False)

    def save_one_of(_):
        one_step()
    mid_save = run_kills(folder, save_one_of, check, np.random.default_rng(2))
    assert mid_save > 0


# ---- a write that fails halfway ------------------------------------------------------------------
class FailingFile:
    """A binary file that raises OSError once ``budget`` bytes in all have been written."""

    written = 0

    def __init__(self, f, budget):
        self._f, self._budget = f, budget

    def write(self, data):
        room = self._budget - FailingFile.written
        if len(data) > room:
            self._f.write(bytes(data)[:max(room, 0)])  # half a write reaches the disk...
            raise OSError("disk full")                 # ...then the disk fills up
        FailingFile.written += len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def fail_writes_after(monkeypatch, budget: int) -> None:
    """Every file io.atomic_write opens from now on fails after ``budget`` bytes in total."""
    real_fdopen = os.fdopen
    FailingFile.written = 0
    monkeypatch.setattr(lio.os, "fdopen", lambda fd, *a, **k: FailingFile(real_fdopen(fd, *a, **k), budget))


def folder_bytes(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


WRITERS = {  # name -> (write the old version, write the new version) into tmp_path
    "save_arrays": (lambda d: lio.save_arrays(d / "a.npz", {"x": np.arange(50.0)}),
                    lambda d: lio.save_arrays(d / "a.npz", {"x": np.zeros(500), "y": np.ones(9)})),
    "save_json": (lambda d: lio.save_json(d / "a.json", {"x": 1}),
                  lambda d: lio.save_json(d / "a.json", {"x": list(range(300))})),
    "history_csv": (lambda d: save_history_csv([{"step": 1, "loss": 2.0}], d / "history.csv"),
                    lambda d: save_history_csv([{"step": i, "loss": 1.0 / i} for i in range(1, 200)],
                                               d / "history.csv")),
    "checkpoint_folder": (lambda d: save_model(d / "ckpt", GPT(TINY, seed=0), {"version": 0}),
                          lambda d: save_model(d / "ckpt", GPT(TINY, seed=1), {"version": 1})),
}


@pytest.mark.parametrize("budget", [0, 100, 2000])
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_write_failing_halfway_leaves_the_previous_file(tmp_path, monkeypatch, writer, budget):
    """The disk fills up after ``budget`` bytes of the new save: the error reaches the caller,
    the previous file (or folder, byte for byte) is intact, and no temporary file is left."""
    write_old, write_new = WRITERS[writer]
    write_old(tmp_path)
    before = {p.name: (folder_bytes(p) if p.is_dir() else p.read_bytes()) for p in tmp_path.iterdir()}
    fail_writes_after(monkeypatch, budget)
    with pytest.raises(OSError, match="disk full"):
        write_new(tmp_path)
    monkeypatch.undo()
    after = {p.name: (folder_bytes(p) if p.is_dir() else p.read_bytes()) for p in tmp_path.iterdir()}
    assert after == before
    write_new(tmp_path)  # and the next save, with room on the disk, goes through
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)


# ---- the swap itself -------------------------------------------------------------------------------
def test_a_crash_between_the_two_renames_is_recovered_by_the_loader(tmp_path):
    """The one moment the folder is missing: the old save has been parked, the new one is not
    yet in place. The loader moves the parked save back; the next save removes the leftovers."""
    folder = tmp_path / "ckpt"
    save_model(folder, perturbed_gpt(1), {"version": 0})
    expected = host(load_model(folder)[0].state_dict())
    os.rename(folder, tmp_path / ".ckpt.old-123456")     # what the first rename did
    (tmp_path / ".ckpt.tmp-abc").mkdir()                  # and an unfinished new save beside it
    (tmp_path / ".ckpt.tmp-abc" / "model.npz").write_bytes(b"PK half")
    loaded, meta = load_model(folder)
    assert meta["version"] == 0
    assert_same_arrays(loaded.state_dict(), expected)
    assert leftovers(folder) == [".ckpt.tmp-abc"]         # never a complete save: left for the next one
    save_model(folder, perturbed_gpt(2), {"version": 1})
    assert leftovers(folder) == []
    assert load_model(folder)[1]["version"] == 1


def test_a_folder_that_is_not_an_earlier_save_is_never_replaced(tmp_path):
    """Replacing a folder deletes what it held, so only an earlier save of the same kind (or an
    empty folder) is replaced; anything else is refused and left as it was."""
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no config.json"):
        save_model(tmp_path, GPT(TINY, seed=0))
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    save_model(empty, GPT(TINY, seed=0))
    assert sorted(p.name for p in empty.iterdir()) == ["config.json", "model.npz"]


def test_history_csv_round_trips_through_the_atomic_writer(tmp_path):
    path = save_history_csv([{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25, "acc": 1.0}],
                            tmp_path / "h.csv")
    assert path.read_text().splitlines() == ["step,loss,acc", "1,0.5,", "2,0.25,1.0"]


def test_no_module_writes_a_file_except_through_io():
    """Every write goes through io.py's atomic writers: no other module opens a file for
    writing or writes one in place (a kill would tear it)."""
    package = Path(lora_numpy.__file__).parent
    direct = re.compile(r"""open\([^)]*["'][wax]b?\+?["']|\.write_(text|bytes)\(|np\.save(z|txt)?\(""")
    offenders = [f"{path.relative_to(package)}:{n}: {line.strip()}"
                 for path in sorted(package.rglob("*.py")) if path.name != "io.py"
                 for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                 if direct.search(line)]
    assert offenders == []
