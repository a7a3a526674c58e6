"""Seconds per augmented batch of the batch pipeline with 0 (a thread), 1, 2 and 4 worker processes
(issue 15), for the paper's configuration (160x160x80 x 2, its augmentation at p = 0.15 each) and
for the Hippocampus plan, beside the step time they must keep up with.

    python benchmarks/batch_pipeline.py [--batches 16]

Each figure is the steady-state time per batch after the first (worker start-up excluded),
consuming batches as fast as they come (no training step), so it is what the pipeline can deliver.
Reference step times: the paper's network at 80x160x160 x 2 trains at 0.16 s/step on an H200
(benchmarks/results/gpu_memory_torch.json), the Hippocampus CPU plan at about 0.3 s/step here.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import HIPPOCAMPUS  # noqa: E402

GPU_PAPER_STEP_S = 0.16


def per_batch(ws, pre, ids, workers: int, n: int) -> float:
    from segplan.runner.training.batches import batch_stream
    with batch_stream(pre, ids, ws.plan, 0, workers) as epoch_batches:
        it = epoch_batches(0, n + 1)
        next(it)
        t = time.perf_counter()
        for _ in it:
            pass
    return (time.perf_counter() - t) / n


def report(name: str, ws, ids, n: int, step_s: float) -> None:
    from segplan.runner.preprocessing.preprocess import preprocess_dataset
    pre = preprocess_dataset(ws, workers=2, progress=False)
    tr = ws.plan.training
    print(f"{name}: patch {tr.patch_size} x {tr.batch_size}, {len(ids)} cases")
    for w in (0, 1, 2, 4):
        s = per_batch(ws, pre, ids, w, n)
        print(f"  workers {w} ({'thread' if w == 0 else 'processes'}): {s:.3f} s/batch = "
              f"{100 * s / step_s:.0f}% of a {step_s:g} s step", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=16)
    a = ap.parse_args()
    from segplan.datasets.phantoms import make_phantoms
    from segplan.planner.planning import plan_dataset
    from segplan.runner.workspace import Workspace
    print(f"{os.cpu_count()} CPU cores")
    tmp = Path(tempfile.mkdtemp())
    data = make_phantoms(tmp / "phantoms", cases=6, seed=2, scale=0.5, workers=2, progress=False)
    paper = plan_dataset(data, tmp / "paper.yaml", preset="miscnn-covid19", progress=False)
    ws = Workspace(paper)
    report("paper configuration (miscnn-covid19 preset, 6 half-size phantoms)", ws,
           [c.case_id for c in ws.dataset.cases], a.batches, GPU_PAPER_STEP_S)
    if HIPPOCAMPUS.is_dir():
        ws = Workspace(Path(__file__).resolve().parents[1] / "plans" / "hippocampus_cpu.yaml")
        report("Hippocampus CPU plan (fold 0 training cases)", ws, ws.splits()[0]["train"], a.batches, 0.3)


if __name__ == "__main__":
    main()
