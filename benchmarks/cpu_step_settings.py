"""Seconds per training step of a CPU plan's network under TensorFlow's settings that a 2-core user
might reach for (issue 23): XLA (`jit_compile`) and the intra-/inter-op thread pools.

    python benchmarks/cpu_step_settings.py                      # Hippocampus' 15-minute CPU plan
    python benchmarks/cpu_step_settings.py --filters 8 16 32 64 --patch 32 48 32 --batch 3

Each setting runs in its own process (thread pools are fixed once TensorFlow starts): the plan's
plain U-Net (batch norm, ReLU, transposed convolutions, Tversky + cross-entropy, Adam) on random
data, one warm-up step (graph tracing; XLA compiles here), then the median of ``--steps`` steps.
Prints one line per setting and a JSON line with all of them. Run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (name, jit_compile, intra-op threads, inter-op threads); 0 threads = TensorFlow's default
SETTINGS = [("default (jit auto)", "auto", 0, 0), ("jit_compile=False", "false", 0, 0),
            ("jit_compile=True (XLA)", "true", 0, 0), ("threads 2 / 1", "auto", 2, 1),
            ("threads 2 / 2", "auto", 2, 2), ("threads 1 / 2", "auto", 1, 2), ("threads 1 / 1", "auto", 1, 1)]


def one(jit: str, intra: int, inter: int, filters: list[int], patch: list[int], batch: int, steps: int) -> dict:
    """Time one setting in this process (must be the first TensorFlow use of the process); any
    Keras backend when no thread counts are given (benchmarks/onednn_step.py)."""
    import numpy as np
    if intra or inter:
        import tensorflow as tf
        tf.config.threading.set_intra_op_parallelism_threads(intra)
        tf.config.threading.set_inter_op_parallelism_threads(inter)
    import keras
    sys.path.insert(0, str(ROOT))
    from segplan.planner.build import PAPER_LOSS
    from segplan.planner.plan import NetworkSection, supervised_levels
    from segplan.runner.training.losses import compile_arguments
    from segplan.runner.training.model import build_unet
    from segplan.planner.labels import consecutive
    from segplan.runner.training.targets import targets
    n = len(filters)
    net = NetworkSection(filters=filters, pool_sizes=[[2, 2, 2]] * (n - 1), kernel_sizes=[[3, 3, 3]] * n,
                         convs_per_stage=2, normalization="batch", batchnorm_momentum=0.99, activation="relu",
                         upsampling="transpose", architecture="plain", blocks_per_stage=[], deep_supervision=False)
    levels = supervised_levels(net)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, *patch, 1)).astype(np.float32)
    y = targets(rng.integers(0, 3, (batch, *patch)), consecutive(3), levels)
    model = build_unet(net, 1, 3)
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  jit_compile={"auto": "auto", "true": True, "false": False}[jit] if keras.backend.backend() == "tensorflow"
                  else "auto",
                  **compile_arguments(PAPER_LOSS, levels))
    t = time.perf_counter()
    model.train_on_batch(x, y)
    warm = time.perf_counter() - t
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        model.train_on_batch(x, y)
        times.append(time.perf_counter() - t)
    return {"jit_resolved": bool(model.jit_compile), "warm_up_s": round(warm, 2),
            "seconds_per_step": round(float(np.median(times)), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--filters", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--patch", type=int, nargs=3, default=[32, 48, 32])
    ap.add_argument("--batch", type=int, default=3)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--one", nargs=3, metavar=("JIT", "INTRA", "INTER"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        jit, intra, inter = a.one[0], int(a.one[1]), int(a.one[2])
        print(json.dumps(one(jit, intra, inter, a.filters, a.patch, a.batch, a.steps)))
        return
    shape = ["--filters", *map(str, a.filters), "--patch", *map(str, a.patch), "--batch", str(a.batch),
             "--steps", str(a.steps)]
    results = {}
    for name, jit, intra, inter in SETTINGS:
        run = subprocess.run([sys.executable, __file__, "--one", jit, str(intra), str(inter), *shape],
                             capture_output=True, text=True, check=True)
        results[name] = json.loads(run.stdout.strip().splitlines()[-1])
        r = results[name]
        print(f"{name:24s} {r['seconds_per_step']:.3f} s/step (warm-up {r['warm_up_s']:.1f} s, "
              f"XLA {'on' if r['jit_resolved'] else 'off'})", flush=True)
    print(json.dumps({"filters": a.filters, "patch": a.patch, "batch": a.batch, "settings": results}))


if __name__ == "__main__":
    main()
