"""Fold 0 of nnU-Net's Hippocampus split under a CPU training time budget (issue 7).

    python benchmarks/hippocampus_budget.py [--minutes 15] [--work /tmp/hippo_budget]
    KERAS_BACKEND=torch python benchmarks/hippocampus_budget.py --device gpu --minutes 3 --data DIR --no-best

Plans with `--device cpu --time-budget MINUTES` (speed probe included), trains fold 0 of
../shared/data/Dataset004_Hippocampus/splits_final.json, predicts and evaluates the 52 validation
cases with the final weights (the plan's inference.checkpoint), then once more with the best
checkpoint by the monitored loss, and prints mean Dice per class for both, iterations done, seconds
per iteration and peak memory. Target: mean Dice >= 0.85 for anterior and posterior with 15 minutes
on 2 cores. `--monitor val_loss` reproduces the old protocol (best checkpoint chosen on the 52
validation cases) for a before/after comparison. `--device gpu` plans with nnU-Net's rules for a
GPU memory budget (`--gpu-memory`) instead and trains fold 0 for the same minutes (benchmarks/
gpu_check.sh runs it on a GPU machine, with the dataset brought along and given by `--data`).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import HIPPOCAMPUS as DATA  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--work", default="/tmp/hippo_budget")
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--monitor", choices=["train_loss", "val_loss"], default=None,
                    help="override the plan's training.schedule.monitor")
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--gpu-memory", type=float, default=8.0, help="GPU plans: the memory budget (GB)")
    ap.add_argument("--data", type=Path, default=DATA, help="the dataset (default: ../shared/data/...)")
    ap.add_argument("--no-best", action="store_true", help="skip the second evaluation with checkpoint_best")
    a = ap.parse_args()
    from benchmarks.common import peak_rss_gb
    from segplan.planner.planning import plan_dataset
    from segplan.runner.pipeline import run_fold
    from segplan.runner.workspace import Workspace
    import dataclasses
    from segplan.planner.plan_file import load_plan, save_plan
    plan_path = Path(a.work) / f"hippocampus_{a.device}_{a.minutes:g}min.yaml"
    t = time.perf_counter()
    if a.device == "cpu":
        plan_dataset(a.data, plan_path, device="cpu", time_budget=a.minutes, force=True, progress=False)
    else:
        plan_dataset(a.data, plan_path, device="gpu", gpu_memory=a.gpu_memory, force=True, progress=False, workers=8)
    print(f"plan: {time.perf_counter() - t:.1f} s -> {plan_path}", flush=True)
    p = load_plan(plan_path)
    sched = dataclasses.replace(p.training.schedule, monitor=a.monitor or p.training.schedule.monitor,
                                time_budget_minutes=a.minutes)
    save_plan(p.replace(training=dataclasses.replace(p.training, schedule=sched)), plan_path)
    t = time.perf_counter()
    ws = Workspace(plan_path)
    run_fold(ws, a.fold, restart=True)
    total = time.perf_counter() - t
    fold = ws.fold(a.fold)
    with open(fold.history) as f:
        hist = list(csv.DictReader(f))
    done = json.loads(fold.finished.read_text())
    plan = yaml.safe_load(plan_path.read_text())
    iters = int(plan["training"]["schedule"]["iterations_per_epoch"]) * len(hist)
    s_it = sum(float(r["seconds_per_iteration"]) for r in hist) / len(hist)
    summary = yaml.safe_load(fold.validation_summary.read_text())
    dice = {c: round(v["dice"]["mean"], 4) for c, v in summary["classes"].items()}
    best_dice = None if a.no_best else _best_checkpoint_dice(plan_path, a.fold, fold, a.data)
    from segplan.runner import backend
    print(json.dumps({"device": a.device, "backend": backend.name(), "gpu": backend.has_gpu(),
                      "minutes": a.minutes, "filters": plan["network"]["filters"], "patch": plan["training"]["patch_size"],
                      "batch": plan["training"]["batch_size"], "epochs": len(hist), "iterations_about": iters,
                      "seconds_per_iteration": round(s_it, 3), "best_epoch": done["best_epoch"],
                      "loop_seconds": done.get("loop_seconds"), "outside_steps_share": done.get("outside_steps_share"),
                      "validation_cases": summary["cases"], "monitor": plan["training"]["schedule"]["monitor"],
                      "mean_dice_final": dice, "mean_dice_best_checkpoint": best_dice,
                      "run_seconds_total": round(total, 1), "peak_memory_gib": round(peak_rss_gb(), 2),
                      "gpu_peak_gib": backend.accelerator_peak_gb()}, indent=1))


def _best_checkpoint_dice(plan_path: Path, fold: int, fold_files, data: Path) -> dict:
    """Predict the fold's validation cases again with checkpoint_best and evaluate them."""
    import dataclasses
    from segplan.planner.plan_file import load_plan, save_plan
    from segplan.planner.labels import label_model
    from segplan.runner.evaluation.evaluate import evaluate_folder
    from segplan.runner.inference.predict import predict_folder
    plan = load_plan(plan_path)
    best_plan = plan_path.with_name(plan_path.stem + "_best.yaml")
    save_plan(plan.replace(inference=dataclasses.replace(plan.inference, checkpoint="best")), best_plan)
    ref = fold_files.validation_reference
    images = fold_files.dir / "validation_best_inputs"
    images.mkdir(exist_ok=True)
    for r in ref.iterdir():
        link = images / r.name.replace(".nii.gz", "_0000.nii.gz")
        if not link.exists():
            link.symlink_to(data / "imagesTr" / link.name)
    out = fold_files.dir / "validation_best"
    # the copy keeps dataset.work_dir, so it finds the same fold folder and its checkpoint_best
    predict_folder(best_plan, images, out, folds=[fold], progress=False)
    evaluate_folder(out, ref, lm=label_model(plan))
    summary = yaml.safe_load((out / "summary.yaml").read_text())
    return {c: round(v["dice"]["mean"], 4) for c, v in summary["classes"].items()}


if __name__ == "__main__":
    main()
