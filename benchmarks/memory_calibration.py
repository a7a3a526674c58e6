"""The planner's CPU memory model, measured (issue 15, item 4): one training step per grid point, each
in a fresh child process, peak resident memory beside the planner's estimate.

    python benchmarks/memory_calibration.py [--out benchmarks/results/cpu_memory.json] [--grid full|tiny|networks|2d]
                                            [--repeats 3] [--rows OLD.jsonl]

Per point (patch, batch, first-stage filters, precision, and the kind of network: the plain U-Net or
the residual encoder, with or without deep supervision) the child imports Keras (TensorFlow on
this machine), records its resident memory (the runtime), builds the planner's network for that
patch (benchmarks/gpu_memory.network), compiles it with the plan's loss and Adam, runs one
warm-up and one timed step on random data, and records its peak resident memory (ru_maxrss); each
point runs in ``--repeats`` fresh processes (3) and keeps the median peak. The step's share is
peak - runtime. Then it fits the bytes per kept activation value (float32 and bfloat16
separately), the memory per convolution layer and the process's fixed memory to make the largest
relative error over the points smallest, prints each point's estimate against its measurement
and, with --out, writes both: the constants belong in planner/memory.py (CPU_BYTES_PER_ACTIVATION,
CPU_PROCESS_GB, CPU_GB_PER_CONVOLUTION), and tests/test_memory_model.py holds the planner to the
committed table.
The GPU grid is benchmarks/gpu_memory.py.
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
    # (patch z y x, batch, first filters, precision[, kind: plain (default), plain_ds, resenc, resenc_ds, ...:
    # benchmarks/gpu_memory.point_network])
    "full": [([32, 32, 32], 2, 8, "float32"), ([32, 32, 32], 4, 16, "float32"), ([64, 64, 64], 2, 8, "float32"),
             ([64, 64, 64], 2, 16, "float32"), ([64, 64, 64], 2, 32, "float32"), ([40, 56, 40], 2, 16, "float32"),
             ([40, 56, 40], 9, 32, "float32"), ([64, 128, 128], 2, 16, "float32"), ([80, 160, 160], 2, 32, "float32"),
             ([64, 64, 64], 2, 16, "mixed_bfloat16"), ([64, 128, 128], 2, 16, "mixed_bfloat16"),
             ([80, 160, 160], 2, 32, "mixed_bfloat16")] + [
             # deep supervision and nnU-Net's residual encoder (issue 21)
             ([64, 64, 64], 2, 16, "float32", "plain_ds"), ([64, 128, 128], 2, 16, "float32", "plain_ds"),
             ([32, 32, 32], 2, 16, "float32", "resenc"), ([64, 64, 64], 2, 16, "float32", "resenc"),
             ([64, 64, 64], 2, 16, "float32", "resenc_ds"), ([40, 56, 40], 4, 32, "float32", "resenc_ds"),
             ([64, 128, 128], 2, 16, "float32", "resenc_ds"), ([64, 64, 64], 2, 16, "mixed_bfloat16", "resenc_ds"),
             # the activation's share: leaky ReLU keeps its input, ReLU only its output
             ([64, 64, 64], 2, 16, "float32", "plain_leaky"), ([64, 64, 64], 2, 16, "float32", "resenc_relu"),
             ([32, 32, 32], 2, 8, "float32", "resenc"), ([64, 64, 64], 1, 4, "float32", "resenc")] + [
             # 2D networks (issue 22): a 2d plan's slices
             ([256, 256], 8, 16, "float32"), ([192, 160], 24, 32, "float32"), ([512, 512], 4, 32, "float32"),
             ([256, 256], 8, 16, "mixed_bfloat16"), ([256, 256], 16, 16, "float32", "plain_ds")],
    "tiny": [([16, 32, 32], 2, 4, "float32"), ([32, 32, 32], 2, 8, "float32"), ([32, 32, 32], 2, 8, "float32", "resenc_ds")],
    # only the points added with deep supervision and the residual encoder (the others are measured)
    "networks": [],
    "2d": [],
}
GRIDS["networks"] = [p for p in GRIDS["full"] if len(p) > 4 and len(p[0]) == 3]
GRIDS["2d"] = [p for p in GRIDS["full"] if len(p[0]) == 2]
N_CLASSES = 4
GB = 1024 ** 3


def rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024 ** 2
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure_point(patch, batch, width, precision, kind: str = "plain") -> dict:
    """In this (fresh) process: runtime memory, then one training step's peak."""
    from segplan.runner import backend
    backend.load_quietly()
    import keras
    from benchmarks.gpu_memory import compiled_model, point_network
    runtime = rss_gb()
    keras.mixed_precision.set_global_policy(precision)
    net = point_network(patch, width, kind)
    model, x, y = compiled_model(net, patch, batch)
    times = []
    for _ in range(2):
        t = time.perf_counter()
        model.train_on_batch(x, y)
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    return {"patch": patch, "batch": batch, "filters": net.filters, "precision": precision,
            "architecture": net.architecture, "deep_supervision": net.deep_supervision, "activation": net.activation,
            "step_s": round(times[-1], 3), "runtime_gb": round(runtime, 3), "peak_gb": round(peak, 3),
            "step_gb": round(peak - runtime, 3)}


def median_run(runs: list[dict]) -> dict:
    """One grid point measured in several fresh processes: the run of the median peak, with every
    run's peak beside it (a peak varies by a few percent from run to run: threads, allocator)."""
    ranked = sorted(runs, key=lambda r: r["peak_gb"])
    return {**ranked[(len(ranked) - 1) // 2], "peak_runs_gb": [r["peak_gb"] for r in runs]}


def rows_with_counts(rows: list[dict]) -> list[dict]:
    """Each measured point with the planner's activation count, weight bytes and convolutions."""
    from benchmarks.gpu_memory import row_network
    from segplan.planner.memory import activation_voxels, count_convolutions, count_parameters
    out = []
    for r in rows:
        net = row_network(r)
        out.append({**r, "mixed": r["precision"] != "float32", "network": net,
                    "activations": activation_voxels(net, r["patch"], N_CLASSES) * r["batch"],
                    "weight_bytes": 16 * count_parameters(net, 1, N_CLASSES), "convolutions": count_convolutions(net)})
    return out


def fit(rows: list[dict]) -> dict:
    """The process's fixed memory (runtime plus what a step costs whatever its size), the bytes
    per activation value per precision and the memory per convolution layer: the constants of
    peak - weights and optimiser state = fixed + bytes x activations + per-layer x convolutions
    that make the largest relative error over the points smallest (the goal is every point within
    5%), by linear programming: minimise t with |estimate - peak| <= t x peak at every point."""
    from scipy.optimize import linprog
    a = np.array([[1.0, r["activations"] / GB * (not r["mixed"]), r["activations"] / GB * r["mixed"],
                   r["convolutions"]] for r in rows])
    peak = np.array([r["peak_gb"] for r in rows])
    rest = peak - np.array([r["weight_bytes"] / GB for r in rows])
    scaled, one = a / peak[:, None], np.ones((len(rows), 1))
    result = linprog(np.r_[np.zeros(a.shape[1]), 1.0],
                     A_ub=np.vstack([np.hstack([scaled, -one]), np.hstack([-scaled, -one])]),
                     b_ub=np.r_[rest / peak, -rest / peak], bounds=[(0, None)] * (a.shape[1] + 1))
    fixed, f32, mixed, per_conv, worst = result.x
    return {"process_gb": round(float(fixed), 2), "float32": round(float(f32), 2), "mixed": round(float(mixed), 2),
            "gb_per_convolution": round(float(per_conv), 4), "largest_error": round(float(worst), 4),
            "runtime_gb": round(statistics.median(r["runtime_gb"] for r in rows), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", choices=sorted(GRIDS), default="full")
    ap.add_argument("--out", default=None)
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per point; the median peak is kept")
    ap.add_argument("--point", help=argparse.SUPPRESS)  # the child's entry
    ap.add_argument("--rows", type=Path, help="refit the JSON lines of an earlier run instead of measuring")
    a = ap.parse_args()
    if a.point:
        print(json.dumps(measure_point(*json.loads(a.point))))
        return
    rows = [json.loads(line) for line in a.rows.read_text().splitlines() if line.strip()] if a.rows else []
    for point in [] if a.rows else GRIDS[a.grid]:
        runs = []
        for _ in range(a.repeats):
            r = subprocess.run([sys.executable, __file__, "--point", json.dumps(point)], capture_output=True, text=True)
            if r.returncode != 0:
                print(f"{point}: failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}", flush=True)
                break
            runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
        if len(runs) == a.repeats:
            rows.append(median_run(runs))
            print(json.dumps(rows[-1]), flush=True)
    from segplan.planner.memory import estimate_training_gb
    constants = fit(rows_with_counts(rows))
    print(f"fitted: {constants}")
    for r in rows_with_counts(rows):
        est = estimate_training_gb(r["network"], r["patch"], r["batch"], 1, N_CLASSES, r["mixed"], device="cpu")
        kind = f"{r['network'].architecture}{' +DS' if r['network'].deep_supervision else ''}"
        print(f"{r['patch']} x {r['batch']} {r['filters'][0]}.. {r['precision']} {kind}: measured {r['peak_gb']:.2f} GB, "
              f"model {est:.2f} GB ({est / r['peak_gb'] - 1:+.1%}), {r['step_s']} s/step")
    if a.out:
        Path(a.out).write_text(json.dumps({"machine": f"{_cores()} cores", "fitted": constants, "grid": rows},
                                          indent=1))


def _cores() -> int:
    import os
    return os.cpu_count() or 0


if __name__ == "__main__":
    main()
