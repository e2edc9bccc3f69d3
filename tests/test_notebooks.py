"""Every notebook runs top to bottom in fast mode (LORA_NUMPY_FAST=1 shrinks its training runs),
so none can rot. Outputs are not written back: the committed ones come from a full run."""
import os
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_in_fast_mode(path, tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_NUMPY_FAST", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # One BLAS thread: on a busy 2-core machine, threads fighting for cores slow a kernel 5-10x.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
    assert time.perf_counter() - start < 120, f"{path.name} took over two minutes in fast mode"


def test_every_notebook_is_linked_from_the_readme():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    assert len(NOTEBOOKS) >= 6, [p.name for p in NOTEBOOKS]
    unlinked = [p.name for p in NOTEBOOKS if f"notebooks/{p.name}" not in readme]
    assert not unlinked, f"README.md does not link {unlinked}"
