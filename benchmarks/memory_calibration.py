"""The planner's CPU memory model, measured (issue 15, item 4): one training step per grid point, each
in a fresh child process, peak resident memory beside the planner's estimate.

    python benchmarks/memory_calibration.py [--out benchmarks/results/cpu_memory.json] [--grid full|tiny]

Per point (patch, batch, first-stage filters, precision) the child imports Keras (TensorFlow on
this machine), records its resident memory (the runtime), builds the default planner's network for
that patch (benchmarks/gpu_memory.network), compiles it with the plan's loss and Adam, runs one
warm-up and one timed step on random data, and records its peak resident memory (ru_maxrss). The
step's share is peak - runtime. Then it fits, by least squares over the points, the bytes per kept
activation value (float32 and bfloat16 separately) and the process's fixed memory, prints each
point's estimate against its measurement and, with --out, writes both: the constants belong in
planner/memory.py (CPU_BYTES_PER_ACTIVATION, CPU_PROCESS_GB), and tests/test_memory_model.py holds
the planner to the committed table. The GPU grid is benchmarks/gpu_memory.py.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GRIDS = {
    # (patch z y x, batch, first filters, precision)
    "full": [([32, 32, 32], 2, 8, "float32"), ([32, 32, 32], 4, 16, "float32"), ([64, 64, 64], 2, 8, "float32"),
             ([64, 64, 64], 2, 16, "float32"), ([64, 64, 64], 2, 32, "float32"), ([40, 56, 40], 2, 16, "float32"),
             ([40, 56, 40], 9, 32, "float32"), ([64, 128, 128], 2, 16, "float32"), ([80, 160, 160], 2, 32, "float32"),
             ([64, 64, 64], 2, 16, "mixed_bfloat16"), ([64, 128, 128], 2, 16, "mixed_bfloat16"),
             ([80, 160, 160], 2, 32, "mixed_bfloat16")],
    "tiny": [([16, 32, 32], 2, 4, "float32"), ([32, 32, 32], 2, 8, "float32")],
}
N_CLASSES = 4
GB = 1024 ** 3


def rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024 ** 2
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure_point(patch, batch, width, precision) -> dict:
    """In this (fresh) process: runtime memory, then one training step's peak."""
    from runner import backend
    backend.load_quietly()
    import keras
    from benchmarks.gpu_memory import compiled_model, network
    runtime = rss_gb()
    keras.mixed_precision.set_global_policy(precision)
    net = network(patch, width)
    model, x, y = compiled_model(net, patch, batch)
    times = []
    for _ in range(2):
        t = time.perf_counter()
        model.train_on_batch(x, y)
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    return {"patch": patch, "batch": batch, "filters": net.filters, "precision": precision,
            "step_s": round(times[-1], 3), "runtime_gb": round(runtime, 3), "peak_gb": round(peak, 3),
            "step_gb": round(peak - runtime, 3)}


def rows_with_counts(rows: list[dict]) -> list[dict]:
    """Each measured point with the planner's activation count and weight bytes."""
    from benchmarks.gpu_memory import network
    from planner.memory import activation_voxels, count_parameters
    out = []
    for r in rows:
        net = network(r["patch"], r["filters"][0])
        out.append({**r, "mixed": r["precision"] != "float32",
                    "activations": activation_voxels(r["patch"], net.filters, net.pool_sizes, 2, N_CLASSES) * r["batch"],
                    "weight_bytes": 16 * count_parameters(net.filters, net.kernel_sizes, net.pool_sizes, 2, 1, N_CLASSES)})
    return out


def fit(rows: list[dict]) -> dict:
    """The process's fixed memory (runtime plus what a step costs whatever its size) and the bytes
    per activation value per precision: least squares of peak - weights and optimiser state =
    fixed + bytes x activations, each point weighted by 1 / its peak (relative error counts)."""
    a = np.array([[1.0, r["activations"] / GB * (not r["mixed"]), r["activations"] / GB * r["mixed"]] for r in rows])
    b = np.array([r["peak_gb"] - r["weight_bytes"] / GB for r in rows])
    w = 1.0 / np.array([r["peak_gb"] for r in rows])
    fixed, f32, mixed = np.linalg.lstsq(a * w[:, None], b * w, rcond=None)[0]
    return {"process_gb": round(float(fixed), 2), "float32": round(float(f32), 2), "mixed": round(float(mixed), 2),
            "runtime_gb": round(statistics.median(r["runtime_gb"] for r in rows), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", choices=sorted(GRIDS), default="full")
    ap.add_argument("--out", default=None)
    ap.add_argument("--point", help=argparse.SUPPRESS)  # the child's entry
    ap.add_argument("--rows", type=Path, help="refit the JSON lines of an earlier run instead of measuring")
    a = ap.parse_args()
    if a.point:
        print(json.dumps(measure_point(*json.loads(a.point))))
        return
    rows = [json.loads(line) for line in a.rows.read_text().splitlines() if line.strip()] if a.rows else []
    for point in [] if a.rows else GRIDS[a.grid]:
        r = subprocess.run([sys.executable, __file__, "--point", json.dumps(point)], capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{point}: failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}", flush=True)
            continue
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    from planner.memory import estimate_training_gb
    constants = fit(rows_with_counts(rows))
    print(f"fitted: {constants}")
    for r in rows_with_counts(rows):
        est = estimate_training_gb(r["patch"], r["batch"], r["filters"], *_topology(r), 2, 1, N_CLASSES, r["mixed"],
                                   device="cpu")
        r["estimate_gb"] = round(est, 3)
        print(f"{r['patch']} x {r['batch']} {r['filters'][0]}.. {r['precision']}: measured {r['peak_gb']:.2f} GB, "
              f"model {est:.2f} GB ({est / r['peak_gb'] - 1:+.0%}), {r['step_s']} s/step")
    if a.out:
        Path(a.out).write_text(json.dumps({"machine": f"{_cores()} cores", "fitted": constants,
                                           "grid": [{k: v for k, v in r.items() if k not in ("mixed",)}
                                                    for r in rows]}, indent=1))


def _topology(r):
    from benchmarks.gpu_memory import network
    net = network(r["patch"], r["filters"][0])
    return net.kernel_sizes, net.pool_sizes


def _cores() -> int:
    import os
    return os.cpu_count() or 0


if __name__ == "__main__":
    main()
