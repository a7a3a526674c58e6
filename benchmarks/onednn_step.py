"""Seconds per training step of a CPU plan's network with TensorFlow's oneDNN off and on, and on
the other Keras backends installed (issue 40): what segplan's oneDNN default buys on this CPU.

    python benchmarks/onednn_step.py                                  # the 5-minute Hippocampus plan's network
    python benchmarks/onednn_step.py --filters 16 32 64 128 --steps 15

TensorFlow enables oneDNN by default only on CPUs with AVX-512 neural-network features; segplan
turns it on elsewhere (segplan.runner.backend.prefer_onednn). Each setting runs in its own process,
interleaved ``--rounds`` times (a shared machine drifts): the plan's plain U-Net on random data
(benchmarks/cpu_step_settings.py's ``one``), one warm-up step, then the median of ``--steps``.
Prints one line per setting and round, then the medians and a JSON line.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# (name, environment for the child); TF_ENABLE_ONEDNN_OPTS set explicitly wins over segplan's default
SETTINGS = [("tensorflow, oneDNN off", {"KERAS_BACKEND": "tensorflow", "TF_ENABLE_ONEDNN_OPTS": "0"}),
            ("tensorflow, oneDNN on", {"KERAS_BACKEND": "tensorflow", "TF_ENABLE_ONEDNN_OPTS": "1"}),
            ("jax", {"KERAS_BACKEND": "jax"}),
            ("torch", {"KERAS_BACKEND": "torch"})]


def cpu_flags() -> str:
    """The AVX-512 neural-network features TensorFlow looks for, or their absence (Linux)."""
    try:
        flags = next(l for l in open("/proc/cpuinfo") if l.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    found = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags]
    return " ".join(found) or "no AVX2"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--filters", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--patch", type=int, nargs=3, default=[32, 48, 32])
    ap.add_argument("--batch", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    shape = ["--filters", *map(str, a.filters), "--patch", *map(str, a.patch), "--batch", str(a.batch),
             "--steps", str(a.steps)]
    print(f"CPU: {cpu_flags()}; {os.cpu_count()} cores visible", flush=True)
    settings = [(n, env) for n, env in SETTINGS if importlib.util.find_spec(env["KERAS_BACKEND"]) is not None]
    runs: dict[str, list[float]] = {n: [] for n, _ in settings}
    for r in range(a.rounds):
        for name, env in settings:
            child = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"} | env
            out = subprocess.run([sys.executable, str(HERE / "cpu_step_settings.py"), "--one", "auto", "0", "0", *shape],
                                 capture_output=True, text=True, check=True, env=child)
            s = json.loads(out.stdout.strip().splitlines()[-1])["seconds_per_step"]
            runs[name].append(s)
            print(f"round {r + 1}: {name:24s} {s:.3f} s/step", flush=True)
    medians = {n: round(statistics.median(v), 4) for n, v in runs.items()}
    for n, m in medians.items():
        print(f"{n:24s} median {m:.3f} s/step")
    off, on = medians.get("tensorflow, oneDNN off"), medians.get("tensorflow, oneDNN on")
    if off and on:
        print(f"oneDNN on: {off / on:.2f}x the steps per second of oneDNN off")
    print(json.dumps({"cpu": cpu_flags(), "filters": a.filters, "patch": a.patch, "batch": a.batch,
                      "steps": a.steps, "runs": runs, "medians": medians}))


if __name__ == "__main__":
    main()
