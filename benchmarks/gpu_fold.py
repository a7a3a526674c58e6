"""One real fold on a GPU, through segplan's own pipeline (issue 15): phantoms -> the default plan
for a GPU memory budget -> `run` fold 0 for a few epochs -> prediction and evaluation of its
validation cases. Prints (and writes to --out) the plan's patch/batch/estimate, the backend's peak
of allocated GPU memory against the budget, seconds per iteration, how long the batch pipeline
takes per batch on its own, and the validation Dice.

    KERAS_BACKEND=torch python benchmarks/gpu_fold.py --gpu-memory 8 --epochs 3 --iterations 40 [--probe] [--cap]

``--probe`` plans with `segplan plan --probe` (patch and batch fitted by measured peaks); ``--cap``
limits this process to the budget (torch.cuda.set_per_process_memory_fraction), so a plan that does
not fit an 8 GB card fails here with an out-of-memory error even on a larger GPU.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu-memory", type=float, default=8.0)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--cases", type=int, default=10)
    ap.add_argument("--scale", type=float, default=0.35)
    ap.add_argument("--out", default=None)
    ap.add_argument("--probe", action="store_true")
    ap.add_argument("--cap", action="store_true")
    a = ap.parse_args()
    import keras
    from segplan.datasets.phantoms import make_phantoms
    from segplan.planner.plan_file import load_plan, save_plan
    from segplan.planner.planning import plan_dataset
    from segplan.runner import backend
    from segplan.runner.training.data import PatchSampler, build_augmentation, make_batch
    from segplan.runner.pipeline import run_fold
    from segplan.runner.preprocessing.preprocess import preprocess_dataset
    from segplan.runner.workspace import Workspace
    tmp = Path(tempfile.mkdtemp())
    t = time.perf_counter()
    data = make_phantoms(tmp / "phantoms", cases=a.cases, seed=0, scale=a.scale, workers=8, progress=False)
    plan_path = plan_dataset(data, tmp / "plans" / "gpu.yaml", gpu_memory=a.gpu_memory, progress=False, workers=8,
                             device="gpu", gpu_probe=a.probe)
    print(f"plan{' with --probe' if a.probe else ''}: {time.perf_counter() - t:.1f} s", flush=True)
    plan = load_plan(plan_path)
    sched = dataclasses.replace(plan.training.schedule, max_epochs=a.epochs, iterations_per_epoch=a.iterations)
    save_plan(plan.replace(training=dataclasses.replace(plan.training, schedule=sched)), plan_path)
    ws = Workspace(plan_path)
    plan = ws.plan
    print(f"phantoms + plan: {time.perf_counter() - t:.1f} s; patch {plan.training.patch_size} x batch "
          f"{plan.training.batch_size}, filters {plan.network.filters}, estimate {plan.memory.estimate_gb} GB of "
          f"{plan.memory.gpu_memory_gb} GB", flush=True)
    pre = preprocess_dataset(ws, workers=8, progress=False)
    split = ws.splits()[0]
    sampler = PatchSampler(pre, split["train"], plan.training.patch_size, plan.training.sampling.foreground_oversampling)
    augment = build_augmentation(plan.training.augmentation, plan.training.patch_size)
    t = time.perf_counter()
    for i in range(5):
        make_batch(sampler, augment, plan, 0, 0, i)
    pipeline_s = (time.perf_counter() - t) / 5
    torch_peak = reserved_peak = None
    if backend.name() == "torch":
        import torch
        torch.cuda.reset_peak_memory_stats()
        if a.cap:
            total = torch.cuda.get_device_properties(0).total_memory / 1024 ** 3
            torch.cuda.set_per_process_memory_fraction(min(1.0, plan.memory.gpu_memory_gb / total))
    t = time.perf_counter()
    run_fold(ws, 0)
    run_s = time.perf_counter() - t
    if backend.name() == "torch":
        import torch
        torch_peak = torch.cuda.max_memory_allocated() / 1024 ** 3
        reserved_peak = torch.cuda.max_memory_reserved() / 1024 ** 3
    fold = ws.fold(0)
    with open(fold.history) as f:
        hist = list(csv.DictReader(f))
    import yaml
    summary = yaml.safe_load(fold.validation_summary.read_text())
    result = {"backend": backend.name(), "keras": keras.__version__, "gpu": backend.has_gpu(),
              "patch": plan.training.patch_size, "batch": plan.training.batch_size, "filters": plan.network.filters,
              "budget_gb": plan.memory.gpu_memory_gb, "estimate_gb": plan.memory.estimate_gb,
              "peak_allocated_gb": None if torch_peak is None else round(torch_peak, 2),
              "peak_reserved_gb": None if reserved_peak is None else round(reserved_peak, 2),
              "measured_by_probe_gb": plan.memory.measured_gb, "capped_to_budget": a.cap,
              "budget_used": None if torch_peak is None else round(torch_peak / plan.memory.gpu_memory_gb, 2),
              "epochs": len(hist), "seconds_per_iteration": [float(r["seconds_per_iteration"]) for r in hist],
              "pipeline_seconds_per_batch_one_thread": round(pipeline_s, 3), "run_seconds": round(run_s, 1),
              "validation_dice": {c: round(v["dice"]["mean"], 3) for c, v in summary["classes"].items()},
              "train_loss": [round(float(r["train_loss"]), 3) for r in hist]}
    print(json.dumps(result, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
