"""Training throughput and preprocessing speed (issue 4).

    python benchmarks/train_throughput.py [--phantoms /tmp/segplan_phantoms20] [--steps 6]

1. Seconds per iteration with and without augmentation (augmentation produced by the background
   thread, as in training) for a small CPU plan and for a 96 x 96 x 48 patch of the paper's network
   (32..512 filters, batch 2). Target: augmentation adds at most 10% to the step time on 2 cores.
2. Preprocessing time per case of the full-size phantoms (2 workers) beside a plain SimpleITK
   read + resample + write of the same files, and peak memory. nnU-Net v2 needed 26 s per case and
   5.9 GB peak (10.7 GB across workers) for these CTs on the 2-core reference machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def step_times(plan, pre, ids, steps: int) -> tuple[float, float]:
    """Seconds per iteration without and with the plan's augmentation, batches made as in training."""
    from segplan.runner.training.batches import batch_stream
    from segplan.runner.training.train import compile_model
    model = compile_model(plan, 1e-3)
    off = dataclasses.replace(plan.training.augmentation,
                              **{f: 0.0 for f in vars(plan.training.augmentation) if f.endswith("_p")})
    out = []
    for p in (plan.replace(training=dataclasses.replace(plan.training, augmentation=off)), plan):
        with batch_stream(pre, ids, p, 0, p.training.workers) as epoch_batches:
            batches = epoch_batches(0, steps + 1)
            x, y = next(batches)
            model.train_on_batch(x, y)  # trace
            t = time.perf_counter()
            for x, y in batches:
                model.train_on_batch(x, y)
            out.append((time.perf_counter() - t) / steps)
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phantoms", default="/tmp/segplan_phantoms20")
    ap.add_argument("--steps", type=int, default=6)
    a = ap.parse_args()
    from benchmarks.common import peak_rss_gb
    from segplan.datasets.phantoms import make_phantoms
    from segplan.planner.plan_file import load_plan, save_plan
    from segplan.planner.planning import plan_dataset
    from segplan.runner.preprocessing.preprocess import preprocess_dataset
    from segplan.runner.workspace import Workspace
    tmp = Path(tempfile.mkdtemp())
    small = make_phantoms(tmp / "small", cases=6, seed=1, scale=0.25, progress=False)
    p = plan_dataset(small, tmp / "small.yaml", device="cpu", time_budget=15, progress=False)
    plan = load_plan(p)
    aug_all = dataclasses.replace(plan.training.augmentation)
    pre = preprocess_dataset(Workspace(p, plan), progress=False)
    ids = [f"phantom_{i:03d}" for i in range(6)]
    plain, aug = step_times(plan, pre, ids, a.steps)
    print(f"small CPU plan {plan.training.patch_size} x {plan.training.batch_size}, filters {plan.network.filters}: "
          f"{plain:.3f} s/it plain, {aug:.3f} s/it with augmentation ({100 * (aug / plain - 1):+.0f}%)")
    paper = plan.replace(
        network=dataclasses.replace(plan.network, filters=[32, 64, 128, 256, 512], pool_sizes=[[2, 2, 2]] * 4,
                                    kernel_sizes=[[3, 3, 3]] * 5),
        training=dataclasses.replace(plan.training, patch_size=[48, 96, 96], batch_size=2, augmentation=aug_all))
    save_plan(paper, tmp / "paper.yaml")
    paper = load_plan(tmp / "paper.yaml", check_paths=False)
    plain, aug = step_times(paper, pre, ids, max(2, a.steps // 2))
    print(f"paper network 32..512, patch 96x96x48 x 2: {plain:.2f} s/it plain, {aug:.2f} s/it with augmentation "
          f"({100 * (aug / plain - 1):+.0f}%)")
    data = Path(a.phantoms)
    if not (data / "dataset.json").exists():
        make_phantoms(data, cases=20, workers=2)
    from benchmarks.sitk_baseline import sitk_read_resample_write
    p = plan_dataset(data, tmp / "big.yaml", gpu_memory=8, workers=2, progress=False)
    big = load_plan(p)
    t = time.perf_counter()
    preprocess_dataset(Workspace(p, big), workers=2, progress=False)
    pre_s = time.perf_counter() - t
    t = time.perf_counter()
    sitk_read_resample_write(data, big.resampling.target_spacing, tmp / "sitk_out", workers=2)
    base_s = time.perf_counter() - t
    n = len(list((data / "imagesTr").iterdir()))
    print(f"preprocess {n} full-size phantoms, 2 workers: {pre_s:.1f} s = {pre_s / n:.2f} s/case "
          f"(plain SimpleITK read + resample + write: {base_s / n:.2f} s/case)")
    print(f"peak memory (largest process): {peak_rss_gb():.2f} GiB")


if __name__ == "__main__":
    main()
