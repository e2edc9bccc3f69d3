"""Does the main job's verdict survive a change of machine? Runs the default job,
``python -m lora_numpy compare``, from a cold cache under each setting below, in a fresh
process each, and prints every run's verdict lines and how far its numbers moved.

    python benchmarks/robustness.py                    # ~10 minutes on 2 cores
    python benchmarks/robustness.py --no-kernel        # the thread counts only
    python benchmarks/robustness.py --json robust.json -- --steps 100   # compare's own flags after --

Settings:
    1 thread     OMP_NUM_THREADS=1: every run in one process, one after the other
    2 threads    OMP_NUM_THREADS=2: two runs at a time, each on one thread
    2 threads, Haswell kernels   OPENBLAS_CORETYPE=Haswell as well: OpenBLAS's AVX2 kernels, which
                 sum some products in another order than the kernels it picks for this CPU (where
                 the CPU can run them: AVX2, x86-64). This is what another machine does to the
                 job's arithmetic, on this machine.

The first two must agree bit for bit (parallel.py: a run's bits do not depend on the thread
count), so their verdict lines are identical. The kernel setting trains on other last bits; how
far its outcomes move, and whether its verdicts hold, is the measurement. This script prints
figures; it never passes or fails.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {"1 thread": {"OMP_NUM_THREADS": "1"},
            "2 threads": {"OMP_NUM_THREADS": "2"},
            "2 threads, Haswell kernels": {"OMP_NUM_THREADS": "2", "OPENBLAS_CORETYPE": "Haswell"}}


def verdict_lines(stdout: str) -> list:
    """The lines after the rule of the paired verdicts ("paired over ..."), up to the blank line."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("paired over"))
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    return lines[start:end]


def run(name: str, env: dict, folder: Path, extra: list) -> dict:
    """One cold run of the job under ``env``: its stdout, verdicts, results and wall time."""
    out, cache = folder / name.replace(" ", "_").replace(",", ""), folder / ("cache-" + name.replace(" ", "_").replace(",", ""))
    for path in (out, cache):
        shutil.rmtree(path, ignore_errors=True)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "lora_numpy", "compare", "--out", str(out), "--cache", str(cache),
                           "--quiet", *extra], env={**os.environ, **env}, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name}: compare failed ({done.returncode}):\n{done.stderr}")
    results = json.loads((out / "results.json").read_text())
    return {"seconds": time.perf_counter() - start, "stdout": done.stdout, "verdicts": verdict_lines(done.stdout),
            "runs": {f"{r['method']} seed {r['seed']}": r for r in results["runs"]}}


def moved(a: dict, b: dict) -> dict:
    """The largest |difference| between two settings' runs: target at end, and source (mean over skills)."""
    source = lambda r: sum(r["source_after"].values()) / len(r["source_after"])
    shared = a["runs"].keys() & b["runs"].keys()
    return {"target": max(abs(a["runs"][k]["target_after"] - b["runs"][k]["target_after"]) for k in shared),
            "source": max(abs(source(a["runs"][k]) - source(b["runs"][k])) for k in shared),
            "identical": all(a["runs"][k] == {**b["runs"][k], "ms_per_step": a["runs"][k]["ms_per_step"]}
                             for k in shared)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/robustness", help="where the runs go (default %(default)s)")
    parser.add_argument("--no-kernel", action="store_true", help="skip the Haswell-kernel setting")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("compare_args", nargs="*", help="flags for compare, after --")
    args = parser.parse_args(argv)
    settings = {k: v for k, v in SETTINGS.items() if not (args.no_kernel and "OPENBLAS_CORETYPE" in v)}
    folder = Path(args.out)
    results = {}
    for name, env in settings.items():
        print(f"running the default job ({' '.join(f'{k}={v}' for k, v in env.items())}) ...", flush=True)
        results[name] = run(name, env, folder, args.compare_args)
        print(f"  finished in {results[name]['seconds']:.0f}s", flush=True)
    first = next(iter(results))
    for name, r in results.items():
        print(f"\n{name}: verdicts")
        print("\n".join(r["verdicts"]))
    print()
    for name, r in list(results.items())[1:]:
        m = moved(results[first], r)
        same = r["verdicts"] == results[first]["verdicts"]
        print(f"{name} against {first}: runs {'bit-identical' if m['identical'] else 'differ'}; largest "
              f"move of a run's target {m['target']:.3f}, of its source {m['source']:.3f}; verdict lines "
              f"{'identical' if same else 'DIFFERENT'}")
        r["against_first"] = {**m, "verdicts_identical": same}
    if args.json:
        Path(args.json).write_text(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "stdout"}
                                               for k, v in results.items()}, indent=1))
    return results


if __name__ == "__main__":
    main()
