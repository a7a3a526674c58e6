"""Build time and memory of the 1D resampling operator (issue 19, point 5), and of applying it.

    python benchmarks/resample_operator.py [--rev GIT_REV] [--sizes 4000 8000] [--repeat 3]

For each axis length N and each resampling (spacing 1.0 -> 0.5 mm: N -> 2N voxels; 1.0 -> 2.0 mm:
N -> N/2), all B-spline order 3, ``segplan.runner.preprocessing.resampling._axis_operator`` is built in a fresh Python
process, which prints:

- build s: the fastest of --repeat builds (wall time, time.perf_counter);
- traced MB: tracemalloc's peak over one build (allocations made through Python and numpy only:
  SimpleITK's C++ image buffers are invisible to it);
- RSS MB: the process's peak resident memory (ru_maxrss) after one build minus before it, with
  the imports done and the input made beforehand: every allocation, C++ included;
- op MB: the bytes of the returned operator (a dense array's nbytes, or a sparse matrix's data and
  index arrays).

Then the whole image resampling (``resample``, order 3) of a (64, 256, 256) float32 volume from
(2.0, 0.8, 0.8) mm to (1.5, 0.6, 0.6) mm, the fastest of --repeat: the time an actual case spends.

``--rev`` measures ``runner/preprocessing/resampling.py`` as committed at that revision (e.g. the commit before
the change) instead of the working tree's, with the same script: the figures before and after.
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_module(rev: str | None):
    """segplan.runner.preprocessing.resampling of the working tree, or as committed at ``rev``."""
    sys.path.insert(0, str(ROOT))
    if rev is None:
        import segplan.runner.preprocessing.resampling as mod
        return mod
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:runner/preprocessing/resampling.py"], check=True,
                         capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "resampling_at_rev.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("resampling_at_rev", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build(mod, n_in: int, n_out: int, sp_in: float, sp_out: float):
    """One order-3 operator; the revision before issue 19 took SimpleITK's interpolator constant."""
    kind = list(inspect.signature(mod._axis_operator).parameters)[-1]
    arg = mod._INTERP[3] if kind == "interp" else 3
    return mod._axis_operator(n_in, n_out, sp_in, sp_out, arg)


def op_bytes(op) -> int:
    if hasattr(op, "indptr"):
        return op.data.nbytes + op.indices.nbytes + op.indptr.nbytes
    return op.nbytes


def measure_one(rev: str | None, n_in: int, n_out: int, sp_in: float, sp_out: float, repeat: int) -> dict:
    """In this (fresh) process: peak RSS delta and tracemalloc peak of the first build, then times."""
    mod = load_module(rev)
    build(mod, 8, 16, 1.0, 0.5)   # warm up imports and SimpleITK's thread pool
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    op = build(mod, n_in, n_out, sp_in, sp_out)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    size = op_bytes(op)
    del op
    tracemalloc.start()
    build(mod, n_in, n_out, sp_in, sp_out)
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        build(mod, n_in, n_out, sp_in, sp_out)
        times.append(time.perf_counter() - t)
    return {"build_s": min(times), "traced_mb": traced / 2 ** 20, "rss_mb": (rss1 - rss0) / 1024,
            "op_mb": size / 2 ** 20}


def measure_volume(rev: str | None, repeat: int) -> float:
    import numpy as np
    mod = load_module(rev)
    img = np.random.default_rng(0).normal(size=(64, 256, 256)).astype(np.float32)
    old, new = [2.0, 0.8, 0.8], [1.5, 0.6, 0.6]
    shape = mod.target_shape(img.shape, old, new)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        mod.resample(img, old, new, shape, 3, 3.0, 0)
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", default=None, help="measure runner/preprocessing/resampling.py at this git revision")
    ap.add_argument("--sizes", type=int, nargs="+", default=[4000, 8000])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:   # one measurement, in its own process
        job = json.loads(args.child)
        if job["what"] == "volume":
            print(json.dumps({"s": measure_volume(args.rev, args.repeat)}))
        else:
            print(json.dumps(measure_one(args.rev, job["n_in"], job["n_out"], job["sp_in"], job["sp_out"],
                                         args.repeat)))
        return

    def child(job: dict) -> dict:
        cmd = [sys.executable, __file__, "--repeat", str(args.repeat), "--child", json.dumps(job)]
        if args.rev:
            cmd += ["--rev", args.rev]
        return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])

    print(f"runner/preprocessing/resampling.py at {args.rev or 'the working tree'}; B-spline order 3; "
          f"fastest of {args.repeat} builds, memory of the first (fresh process each)")
    print(f"{'axis':>24} {'build s':>9} {'traced MB':>10} {'RSS MB':>8} {'op MB':>8}")
    for n in args.sizes:
        for sp_out, n_out in ((0.5, 2 * n), (2.0, n // 2)):
            r = child({"what": "operator", "n_in": n, "n_out": n_out, "sp_in": 1.0, "sp_out": sp_out})
            print(f"{f'{n} -> {n_out} (1.0 -> {sp_out} mm)':>24} {r['build_s']:9.3f} {r['traced_mb']:10.1f} "
                  f"{r['rss_mb']:8.1f} {r['op_mb']:8.2f}")
    s = child({"what": "volume"})["s"]
    print(f"resample (64, 256, 256) (2.0, 0.8, 0.8) -> (1.5, 0.6, 0.6) mm, order 3: {s:.2f} s")


if __name__ == "__main__":
    main()
