"""Deep supervision on vs off at the same CPU training budget (issue 21): fold 0 of nnU-Net's
Hippocampus split, the CPU plan trained twice with everything equal but ``network.deep_supervision``.

    python benchmarks/deep_supervision.py [--minutes 15] [--work /tmp/hippo_ds]
    python benchmarks/deep_supervision.py --minutes 0.5 --max-epochs 2 --cases 10 --no-probe   # a quick check

Plans ../shared/data/Dataset004_Hippocampus once with `--device cpu --time-budget MINUTES` (the
width probe included), writes it twice, deep supervision on and off (nothing else differs: the
same network width, patch, batch, schedule, seed), trains fold 0 of splits_final.json under each
and predicts and evaluates the fold's validation cases with the final weights. Prints, per
variant, the mean Dice per class, the iterations done and seconds per iteration, and one JSON
line with everything. What the CPU planner does by default (planner/cpu_plan.py DEEP_SUPERVISION)
should follow the better variant at the plan's budget. Run it on a quiet machine: the budget is
wall time, so other processes' load changes how far each variant gets.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import HIPPOCAMPUS as DATA  # noqa: E402


def variants(plan, max_epochs: int | None = None) -> dict:
    """The plan with deep supervision on and off, identical otherwise (and, for a quick check, at
    most ``max_epochs`` epochs)."""
    sched = plan.training.schedule
    if max_epochs is not None:
        sched = dataclasses.replace(sched, max_epochs=max_epochs)
    base = plan.replace(training=dataclasses.replace(plan.training, schedule=sched))
    return {name: base.replace(name=f"{plan.name}_{name}", network=dataclasses.replace(plan.network, deep_supervision=on),
                               dataset=dataclasses.replace(plan.dataset, work_dir=f"{plan.dataset.work_dir}_{name}"))
            for name, on in (("ds_on", True), ("ds_off", False))}


def fold_figures(ws, fold: int, plan) -> dict:
    """What one variant reached: Dice per class over the validation cases, iterations, s/iteration."""
    f = ws.fold(fold)
    with open(f.history) as fh:
        hist = list(csv.DictReader(fh))
    done = json.loads(f.finished.read_text())
    summary = yaml.safe_load(f.validation_summary.read_text())
    iters = iterations(hist, plan.training.schedule.iterations_per_epoch, done["training_seconds"])
    return {"deep_supervision": plan.network.deep_supervision, "epochs": len(hist), "iterations": iters,
            "seconds_per_iteration": round(done["training_seconds"] / max(iters, 1), 3),
            "training_seconds": done["training_seconds"], "stopped": done["reason"],
            "validation_cases": summary["cases"],
            "mean_dice": {c: round(v["dice"]["mean"], 4) for c, v in summary["classes"].items()}}


def iterations(history: list[dict], per_epoch: int, training_seconds: float) -> int:
    """Training steps done: full epochs but the last, which the budget may have cut short (its
    share of the training seconds at its own seconds per iteration)."""
    if not history:
        return 0
    before = sum(float(r["seconds_per_iteration"]) * per_epoch for r in history[:-1])
    last = (training_seconds - before) / max(float(history[-1]["seconds_per_iteration"]), 1e-9)
    return (len(history) - 1) * per_epoch + min(per_epoch, max(0, round(last)))


def subset(data: Path, out: Path, n: int) -> Path:
    """A quick check's dataset: the first ``n`` cases of ``data`` as links (no given split, so the
    plan makes its own folds)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "dataset.json").write_text((data / "dataset.json").read_text())
    for sub in ("imagesTr", "labelsTr"):
        (out / sub).mkdir(exist_ok=True)
    for label in sorted((data / "labelsTr").glob("*.nii*"))[:n]:
        case = label.name.split(".")[0]
        for src in [label, *sorted((data / "imagesTr").glob(f"{case}_*"))]:
            link = out / src.parent.name / src.name
            if not link.exists():
                link.symlink_to(src.resolve())
    return out


def plan_once(a) -> Path:
    """The CPU plan for ``a.minutes`` of the dataset (or its first ``a.cases`` cases), written under
    ``a.work`` once for every variant to derive from; its path."""
    from segplan.planner.planning import plan_dataset
    work = Path(a.work)
    data = subset(a.data, work / "subset", a.cases) if a.cases else a.data
    base_path = work / f"hippocampus_cpu_{a.minutes:g}min.yaml"
    t = time.perf_counter()
    plan_dataset(data, base_path, device="cpu", time_budget=a.minutes, force=True, progress=False, probe=not a.no_probe)
    print(f"plan: {time.perf_counter() - t:.1f} s -> {base_path}", flush=True)
    return base_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=15.0, help="training budget of each variant")
    ap.add_argument("--work", default="/tmp/hippo_ds")
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--max-epochs", type=int, default=None, help="a quick check: stop each variant after this many")
    ap.add_argument("--cases", type=int, default=None, help="a quick check: only this many cases of the dataset "
                                                            "(5 folds of their own instead of splits_final.json)")
    ap.add_argument("--no-probe", action="store_true", help="a quick check: skip the planner's width probe")
    a = ap.parse_args()
    import keras
    from segplan.planner.plan_file import load_plan, save_plan
    from segplan.runner.pipeline import run_fold
    from segplan.runner.workspace import Workspace
    work, base_path = Path(a.work), plan_once(a)
    results = {}
    for name, plan in variants(load_plan(base_path), a.max_epochs).items():
        path = work / f"{plan.name}.yaml"
        save_plan(plan, path)
        ws = Workspace(path)
        keras.backend.clear_session()
        t = time.perf_counter()
        run_fold(ws, a.fold, restart=True, progress=False)
        results[name] = fold_figures(ws, a.fold, ws.plan) | {"run_seconds": round(time.perf_counter() - t, 1)}
        r = results[name]
        print(f"{name}: {r['epochs']} epochs, {r['iterations']} iterations at {r['seconds_per_iteration']} s/it, "
              f"Dice {r['mean_dice']} on {r['validation_cases']} cases", flush=True)
    net = load_plan(base_path).network
    print(json.dumps({"minutes": a.minutes, "fold": a.fold, "filters": net.filters,
                      "patch": load_plan(base_path).training.patch_size, "max_epochs": a.max_epochs, "cases": a.cases,
                      "variants": results}, indent=1))


if __name__ == "__main__":
    main()
