"""nnU-Net's configuration family measured (issue 22): which configurations the planner writes for
full-size synthetic chest CTs and at which 3d_lowres spacing; and Hippocampus fold 0 with CPU plans
of equal budget, 2d against 3d_fullres against the ensemble of the two.

    python benchmarks/configurations.py planner                     # no training, seconds
    python benchmarks/configurations.py planner --data /tmp/segplan_phantoms20   # written phantoms, fingerprinted
    python benchmarks/configurations.py hippocampus [--minutes 5] [--work /tmp/hippo_cfg]
    python benchmarks/configurations.py hippocampus --minutes 0.5 --max-epochs 2 --cases 10 --no-probe  # quick check

``planner``: the full-size phantoms of datasets/phantoms.py (cases of 512 or 630 pixels square,
1 to 5 mm slices, 260 to 340 mm long), planned with every configuration that applies for GPU
budgets of 8, 24 and 80 GB and for a CPU. Without ``--data`` the cases are the generator's own
specifications (shape and spacing, exactly those of the files it writes; a CT volume is not
cropped, so that is all the planner reads of it), which spares writing 20 CTs; with ``--data`` a
written dataset is fingerprinted and planned by `segplan plan --configurations all`. Prints, per
budget, each configuration's spacing, patch and batch, and the 3d_fullres plan's coverage of the
median image (nnU-Net's rule: a 3d_lowres stage under 25%).

``hippocampus``: `segplan plan --configurations all --device cpu --time-budget MINUTES` (the width
probe included: both plans are sized for the same budget on this machine), fold 0 of
splits_final.json trained under the 2d and the 3d_fullres plan, each fold's validation cases
predicted with probabilities, and the ensemble: the two plans' probabilities averaged per case on
the original grid, then arg-max. Prints Dice per class of each and of the ensemble, the minutes
and iterations each trained, and one JSON line. Run it on a quiet machine: the budget is wall
time. (`segplan select`, once merged, ranks the same ensemble over all five folds.)
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import HIPPOCAMPUS  # noqa: E402

BUDGETS_GB = (8.0, 24.0, 80.0)
TRAINED = ("2d", "3d_fullres")


def phantom_fingerprint(cases: int = 20, seed: int = 0, scale: float = 1.0):
    """A fingerprint of ``cases`` phantoms (full size by default) from their specifications, no
    files: the geometry the planner reads of them (tests/test_configurations.py checks it against
    written phantoms); the intensity statistics are placeholders, which no configuration rule reads."""
    from segplan.datasets.phantoms import LABELS, make_spec
    from segplan.planner.fingerprint import FINGERPRINT_VERSION, CaseFingerprint, ChannelStats, Fingerprint
    specs = [make_spec(seed, i, scale) for i in range(cases)]
    fps = [CaseFingerprint(s.case_id, list(s.spacing), list(s.shape), list(s.shape),
                           [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0], ["hu"], [1] * len(LABELS)) for s in specs]
    ct = ChannelStats("CT", True, -500.0, 300.0, -1000.0, 500.0, -950.0, -800.0, 100.0, 1000)
    n = len(LABELS)
    return Fingerprint(FINGERPRINT_VERSION, "specs", ["CT"], dict(LABELS), [-1250.0, 250.0], fps, [ct],
                       [1.0 / n] * n, [cases] * n)


def family_rows(family: dict) -> dict:
    """Per configuration: spacing, patch, batch, slice axis and the plan's comment on its configuration."""
    return {c: {"spacing": p.resampling.target_spacing, "patch": p.training.patch_size,
                "batch": p.training.batch_size, "slice_axis": p.slice_axis, "why": r.get("configuration", "")}
            for c, (p, r) in family.items()}


def plan_phantoms(a) -> None:
    from segplan.planner import heuristics as H
    from segplan.planner.build import make_plan
    from segplan.planner.configurations import plan_family
    from segplan.planner.cpu_plan import make_cpu_plan
    from segplan.planner.fingerprint import fingerprint_for
    from segplan.planner.planning import fingerprint_cache
    if a.data:
        t = time.perf_counter()
        fp, cached = fingerprint_for(Path(a.data), fingerprint_cache(Path(a.data), Path(a.work)), workers=2,
                                     progress=False)
        print(f"fingerprint of {a.data}: {time.perf_counter() - t:.1f} s{' (cached)' if cached else ''}")
    else:
        fp = phantom_fingerprint(a.cases)
    spacings = np.array([c.spacing for c in fp.cases])
    shapes = np.array([c.shape for c in fp.cases])
    print(f"{len(fp.cases)} full-size phantoms: median shape {np.median(shapes, 0).tolist()}, median spacing "
          f"{np.round(np.median(spacings, 0), 3).tolist()} mm (z, y, x)")
    makers = {f"gpu {gb:g} GB": (lambda c, gb=gb: make_plan(fp, "ct", "ds", "work", gb, "benchmark", configuration=c))
              for gb in BUDGETS_GB}
    makers["cpu (no probe)"] = lambda c: make_cpu_plan(fp, "ct", "ds", "work", probe=False, configuration=c)
    out = {}
    for name, make in makers.items():
        t = time.perf_counter()
        family = plan_family(make)
        seconds = time.perf_counter() - t
        full = family["3d_fullres"][0]
        median = H.median_resampled_shape(fp, full.resampling.target_spacing)
        cov = math.prod(full.training.patch_size) / math.prod(median)
        out[name] = {"configurations": list(family), "coverage_3d_fullres": round(cov, 4),
                     "plan_seconds": round(seconds, 2)} | {c: {k: v for k, v in row.items() if k != "why"}
                                                           for c, row in family_rows(family).items()}
        print(f"\n{name}: {', '.join(family)} ({seconds:.2f} s); the 3d_fullres patch covers {cov:.1%} of the median "
              f"image {[round(m) for m in median]}")
        for c, row in family_rows(family).items():
            print(f"  {c:19s} spacing {row['spacing']} mm, patch {row['patch']} x batch {row['batch']}"
                  + (f", slices along {'zyx'[row['slice_axis']]}" if row["slice_axis"] is not None else ""))
        if "3d_lowres" not in family:
            print(f"  ({family['3d_fullres'][1]['configuration']})")
    print(json.dumps({"cases": len(fp.cases), "from": a.data or "phantom specs", "budgets": out}))


def ensemble(fold_dirs: dict[str, Path], out: Path, labels: dict[str, int]) -> Path:
    """Average the configurations' saved probabilities (on the original grid) per case, arg-max, and
    write the label maps with the geometry of the first configuration's prediction."""
    from segplan.planner.dataset import read_label, write_volume
    out.mkdir(parents=True, exist_ok=True)
    first = next(iter(fold_dirs.values()))
    values = np.array(list(labels.values()))
    for npz in sorted(first.glob("*.npz")):
        probs = [np.load(d / npz.name)["probabilities"].astype(np.float32) for d in fold_dirs.values()]
        mean = sum(probs) / len(probs)
        _, geom = read_label(first / npz.name.replace(".npz", ".nii.gz"))
        write_volume(values[np.argmax(mean, axis=0)].astype(np.uint8), geom, out / npz.name.replace(".npz", ".nii.gz"))
    return out


def train_hippocampus(a) -> None:
    import dataclasses

    import keras
    import yaml

    from benchmarks.deep_supervision import fold_figures, subset
    from segplan.planner.dataset import Case
    from segplan.planner.plan_file import load_plan, save_plan
    from segplan.planner.planning import plan_configurations
    from segplan.planner.labels import label_model
    from segplan.runner.evaluation.evaluate import evaluate_folder
    from segplan.runner.pipeline import run_fold
    from segplan.runner.inference.models import load_fold_models
    from segplan.runner.inference.predict import predict_cases
    from segplan.runner.workspace import Workspace
    work = Path(a.work)
    data = subset(a.data, work / "subset", a.cases) if a.cases else a.data
    t = time.perf_counter()
    paths = plan_configurations(data, work / f"hippocampus_cpu_{a.minutes:g}min.yaml", device="cpu",
                                time_budget=a.minutes, force=True, progress=False, probe=not a.no_probe)
    print(f"plans ({', '.join(paths)}): {time.perf_counter() - t:.1f} s", flush=True)
    results, predicted = {}, {}
    for c in TRAINED:
        plan = load_plan(paths[c])
        if a.max_epochs is not None:
            plan = plan.replace(training=dataclasses.replace(plan.training, schedule=dataclasses.replace(
                plan.training.schedule, max_epochs=a.max_epochs)))
            save_plan(plan, paths[c])
        ws = Workspace(paths[c])
        keras.backend.clear_session()
        t = time.perf_counter()
        run_fold(ws, a.fold, restart=True, progress=False)
        results[c] = fold_figures(ws, a.fold, ws.plan) | {"run_seconds": round(time.perf_counter() - t, 1),
                                                           "patch": plan.training.patch_size,
                                                           "batch": plan.training.batch_size,
                                                           "filters": plan.network.filters}
        val = set(ws.splits()[a.fold]["val"])
        cases = [Case(x.case_id, x.image_files, None) for x in ws.dataset.cases if x.case_id in val]
        fold_plan, models = load_fold_models(ws, [a.fold])
        predicted[c] = work / "probabilities" / c
        predict_cases(cases, fold_plan, models, predicted[c], save_probabilities=True, progress=False,
                      training_cases=True)
        r = results[c]
        print(f"{c}: patch {r['patch']} x batch {r['batch']}, filters {r['filters']}: {r['epochs']} epochs, "
              f"{r['iterations']} iterations at {r['seconds_per_iteration']} s/it "
              f"({r['training_seconds'] / 60:.1f} min), Dice {r['mean_dice']} on {r['validation_cases']} cases",
              flush=True)
    ws = Workspace(paths["3d_fullres"])
    plan = ws.plan
    both = ensemble(predicted, work / "ensemble", plan.dataset.labels)
    evaluate_folder(both, ws.fold(a.fold).validation_reference, lm=label_model(plan))
    summary = yaml.safe_load((both / "summary.yaml").read_text())
    results["2d+3d_fullres"] = {"mean_dice": {k: round(v["dice"]["mean"], 4) for k, v in summary["classes"].items()},
                                "validation_cases": summary["cases"]}
    print(f"2d+3d_fullres (probabilities averaged): Dice {results['2d+3d_fullres']['mean_dice']}")
    print(json.dumps({"minutes": a.minutes, "fold": a.fold, "max_epochs": a.max_epochs, "cases": a.cases,
                      "results": results}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=["planner", "hippocampus"])
    ap.add_argument("--cases", type=int, default=None, help="planner: phantom specs (default 20); hippocampus: a "
                                                            "quick check on this many cases (their own 5 folds)")
    ap.add_argument("--data", type=Path, default=None, help="planner: a written phantom dataset to fingerprint; "
                                                            "hippocampus: the dataset (default: shared Hippocampus)")
    ap.add_argument("--work", default="/tmp/hippo_cfg")
    ap.add_argument("--minutes", type=float, default=5.0, help="hippocampus: the training budget of each plan")
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--max-epochs", type=int, default=None, help="a quick check: stop each plan after this many")
    ap.add_argument("--no-probe", action="store_true", help="a quick check: skip the CPU planner's width probe")
    a = ap.parse_args()
    if a.part == "planner":
        a.cases = a.cases or 20
        Path(a.work).mkdir(parents=True, exist_ok=True)
        plan_phantoms(a)
    else:
        a.data = a.data or HIPPOCAMPUS
        train_hippocampus(a)


if __name__ == "__main__":
    main()
