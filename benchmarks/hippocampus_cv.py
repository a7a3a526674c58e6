"""5-fold cross-validation of ../shared/data/Dataset004_Hippocampus on this CPU under a fixed
training budget per fold, then `segplan summarize` (issue 6).

    python benchmarks/hippocampus_cv.py [--minutes 5] [--plan plans/hippocampus_cpu.yaml] [--work /tmp/hippo_cv]

The committed plan is copied next to a work folder (its dataset path is rewritten to the shared
data), its time budget set to --minutes, and the folds of nnU-Net's splits_final.json are run in
turn. Prints the Table-1 summary, per fold the time of training and of predicting its validation
cases, the share of the training loop outside training steps and its mean Dice, then the mean
Dice per class over the folds.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import HIPPOCAMPUS as DATA, ROOT  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--plan", default=str(ROOT / "plans" / "hippocampus_cpu.yaml"))
    ap.add_argument("--work", default="/tmp/hippo_cv")
    ap.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--replan", action="store_true",
                    help="plan anew for this CPU and --minutes (the probe picks the width the budget can train)")
    a = ap.parse_args()
    from segplan.planner.plan_file import load_plan, save_plan
    from segplan.runner.evaluation.report import summarize
    from segplan.runner.pipeline import predict_validation
    from segplan.runner.training.train import train_fold
    from segplan.runner.workspace import Workspace
    import dataclasses
    import gc

    import keras
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    if a.replan:
        from segplan.planner.planning import plan_dataset
        a.plan = str(plan_dataset(DATA, work / "replanned.yaml", device="cpu", time_budget=a.minutes, force=True,
                                  progress=False))
    plan = load_plan(a.plan)
    sched = dataclasses.replace(plan.training.schedule, time_budget_minutes=a.minutes)
    plan = plan.replace(training=dataclasses.replace(plan.training, schedule=sched),
                        dataset=dataclasses.replace(plan.dataset, path=os.path.relpath(DATA, work), work_dir="work",
                                                    splits_file=os.path.relpath(DATA / "splits_final.json", work)))
    plan_path = work / "hippocampus_cv.yaml"
    save_plan(plan, plan_path)
    ws = Workspace(plan_path)
    t = time.perf_counter()
    timing = {}
    for k in a.folds:
        if not ws.fold(k).validation_summary.exists():
            keras.backend.clear_session()  # each fold starts from an empty Keras state, as `segplan run` does
            gc.collect()
            t0 = time.perf_counter()
            train_fold(ws, k, restart=True, progress=False)
            t1 = time.perf_counter()
            predict_validation(ws, k, False, redo=True)
            timing[k] = (t1 - t0, time.perf_counter() - t1)
    print(summarize(ws))
    per_epoch = []
    for k in a.folds:
        with open(ws.fold(k).history) as f:
            per_epoch += [float(r["seconds"]) for r in csv.DictReader(f)]
    table = yaml.safe_load(ws.cv_summary_yaml.read_text())["folds"]
    means = {}
    for k in a.folds:
        s = yaml.safe_load(ws.fold(k).validation_summary.read_text())
        for c, v in s["classes"].items():
            means.setdefault(c, []).append(v["dice"]["mean"])
    for k in a.folds:
        done = json.loads(ws.fold(k).finished.read_text())
        s = yaml.safe_load(ws.fold(k).validation_summary.read_text())
        dice = ", ".join(f"{c} {v['dice']['mean']:.3f}" for c, v in s["classes"].items())
        took = (f"train_fold {timing[k][0] / 60:.1f} min (preprocessing included on the first), prediction + "
                f"evaluation of its validation cases {timing[k][1]:.0f} s; " if k in timing else "")
        print(f"fold {k}: {took}training loop {done.get('loop_seconds', float('nan')):.0f} s, "
              f"{done.get('outside_steps_share', float('nan')):.1%} outside training steps, {done['epochs']} epochs; "
              f"mean Dice {dice}")
    print(f"budget {a.minutes:g} min per fold; wall time {(time.perf_counter() - t) / 60:.1f} min; "
          f"{sum(per_epoch) / len(per_epoch):.1f} s per epoch")
    print("mean Dice over folds (mean over cases per fold): " +
          ", ".join(f"{c} {sum(v) / len(v):.3f}" for c, v in means.items()))
    print("average row of the Table-1 layout (medians): " +
          ", ".join(f"{c} {v['dice']:.3f}" for c, v in table["average"].items()))


if __name__ == "__main__":
    main()
