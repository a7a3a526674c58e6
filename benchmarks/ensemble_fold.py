"""One fold of several configurations and of each pairwise ensemble, for the issue-22 figures
(Hippocampus with CPU plans of equal budget: 2d vs 3d_fullres vs their ensemble; fold 0, Dice per
class, minutes).

    python benchmarks/ensemble_fold.py PLAN PLAN ... [--fold 0] [--train]

``--train`` runs `segplan run PLAN --fold K` for each plan first (the plans' own budgets: plan them
with the same `--time-budget`). Then scores every plan alone and every pair (probabilities averaged,
as `segplan select` does over all folds) on fold K's validation cases, from the out-of-fold
probabilities the runs saved, and prints, per candidate, the mean Dice per class and the mean over
the foreground classes, and per plan the minutes of training (finished.json) and of the whole run.
The plans must share labels and split; `segplan select` is what ranks on all folds.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("plans", nargs="+", type=Path)
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--train", action="store_true", help="run the fold of each plan first")
    args = ap.parse_args()
    from segplan.runner.cli import main as segplan
    from segplan.runner.evaluation.oof import missing_probabilities, require_same_split
    from segplan.runner.evaluation.selection import score
    from segplan.runner.workspace import Workspace
    run_minutes = {}
    for plan in args.plans:
        if args.train:
            t = time.perf_counter()
            if segplan(["run", str(plan), "--fold", str(args.fold)]) != 0:
                sys.exit(f"segplan run {plan} --fold {args.fold} failed")
            run_minutes[plan] = (time.perf_counter() - t) / 60
    workspaces = [Workspace(p) for p in args.plans]
    for ws in workspaces:
        if not ws.fold(args.fold).is_finished() or missing_probabilities(ws, args.fold):
            sys.exit(f"{ws.plan_path}: fold {args.fold} has not finished with its probabilities; pass --train")
    require_same_split(workspaces)
    members, dice, n = score(workspaces, progress=False, folds=[args.fold])
    labels = workspaces[0].plan.dataset.labels
    classes = [c for c in labels if labels[c] != 0]
    print(f"fold {args.fold}: {n} validation cases; mean Dice")
    print(f"{'candidate':<34}" + "".join(f"{c[:12]:>13}" for c in classes) + f"{'mean fg':>10}")
    for name in sorted(dice, key=lambda m: -np.mean([np.mean(dice[m][c]) for c in classes])):
        means = [float(np.mean(dice[name][c])) for c in classes]
        print(f"{name:<34}" + "".join(f"{v:>13.4f}" for v in means) + f"{np.mean(means):>10.4f}")
    for ws, plan in zip(workspaces, args.plans):
        done = json.loads(ws.fold(args.fold).finished.read_text())
        extra = f", whole run {run_minutes[plan]:.1f} min" if plan in run_minutes else ""
        print(f"{ws.plan.configuration:<18} {ws.plan.name}: training {done['training_seconds'] / 60:.1f} min, "
              f"{done['epochs']} epochs{extra}")


if __name__ == "__main__":
    main()
