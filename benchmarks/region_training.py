"""Region training against label training at the same CPU budget (issue 41, point 6): Hippocampus
planned for this CPU, then trained twice on fold 0 from the same plan, once per label (softmax over
background / anterior / posterior) and once per region (one sigmoid each for ``hippocampus`` =
labels [1, 2], the large encompassing region, and ``posterior`` = [2]; regions_class_order [1, 2]).
Both are scored per region on the same validation cases with the same code (the label plan's
label maps through the region plan's label model: its union of anterior and posterior is its
``hippocampus``), with the predicted volume against the reference's, so over- or under-segmentation
shows.

    python benchmarks/region_training.py [--minutes 3] [--cases 60] [--work /tmp/region_training]
    python benchmarks/region_training.py --variants regions --bias zero    # one variant, sigmoids from p = 0.5

Prints one line per variant and one JSON line with all of it. The budget is wall time: run it on
a quiet machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import HIPPOCAMPUS as DATA  # noqa: E402

REGIONS = {"hippocampus": [1, 2], "posterior": [2]}
ORDER = [1, 2]


def region_scores(ws, fold: int, out: Path) -> dict:
    """Per region: mean Dice and the predicted / reference volume ratio over the fold's validation
    cases, for either kind of plan (its label maps scored through the region label model)."""
    import yaml
    from segplan.planner.labels import LabelModel
    from segplan.runner.evaluation.evaluate import evaluate_folder
    f = ws.fold(fold)
    lm = LabelModel(dict(ws.plan.dataset.labels), REGIONS, ORDER)
    out.mkdir(parents=True, exist_ok=True)
    for sub, src in (("pred", f.validation), ("ref", f.validation_reference)):
        (out / sub).mkdir(exist_ok=True)
        for p in src.glob("*.nii.gz"):
            link = out / sub / p.name
            link.unlink(missing_ok=True)
            link.symlink_to(p.resolve())
    evaluate_folder(out / "pred", out / "ref", lm=lm)
    summary = yaml.safe_load((out / "pred" / "summary.yaml").read_text())
    return {c: {"dice": round(v["dice"]["mean"], 4),
                "volume_ratio": round(v["pred_ml"]["mean"] / max(v["ref_ml"]["mean"], 1e-9), 3)}
            for c, v in summary["classes"].items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=3.0, help="training budget of each variant")
    ap.add_argument("--cases", type=int, default=60, help="cases of the dataset used (its first ones)")
    ap.add_argument("--variants", nargs="+", default=["labels", "regions"], choices=["labels", "regions"])
    ap.add_argument("--bias", choices=["prior", "zero"], default="prior",
                    help="the region plan's sigmoids start at the log-odds of each region's share of the training "
                         "voxels, as the planner sets training.output_bias (default), or at 0: p = 0.5 everywhere, "
                         "Keras' default and segplan's before")
    ap.add_argument("--work", type=Path, default=Path("/tmp/region_training"))
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--no-probe", action="store_true", help="skip the planner's width probe")
    a = ap.parse_args()
    import keras
    from benchmarks.deep_supervision import fold_figures, subset
    from segplan.planner.dataset_rules import region_output_bias
    from segplan.planner.fingerprint import load_fingerprint
    from segplan.planner.plan_file import load_plan, save_plan
    from segplan.planner.planning import plan_dataset
    from segplan.runner.pipeline import run_fold
    from segplan.runner.workspace import Workspace
    data = subset(a.data, a.work / "data", a.cases)
    base_path = a.work / f"labels_{a.minutes:g}min.yaml"
    if not base_path.exists():
        plan_dataset(data, base_path, device="cpu", time_budget=a.minutes, force=True, progress=False,
                     probe=not a.no_probe)
    base = load_plan(base_path)
    fp = load_fingerprint(next(a.work.glob("*.fingerprint.yaml")))
    bias = region_output_bias(fp, REGIONS) if a.bias == "prior" else []
    plans = {"labels": base.replace(name=f"{base.name}_labels", dataset=dataclasses.replace(
                 base.dataset, work_dir=f"{base.dataset.work_dir}_labels")),
             "regions": base.replace(name=f"{base.name}_regions", dataset=dataclasses.replace(
                 base.dataset, regions=REGIONS, regions_class_order=ORDER, label_groups={},
                 work_dir=f"{base.dataset.work_dir}_regions"),
                 training=dataclasses.replace(base.training, output_bias=bias))}
    results = {}
    for name in a.variants:
        path = a.work / f"{name}.yaml"
        save_plan(plans[name], path)
        ws = Workspace(path)
        keras.backend.clear_session()
        t = time.perf_counter()
        run_fold(ws, 0, restart=True, progress=False)
        r = fold_figures(ws, 0, ws.plan) | {"run_seconds": round(time.perf_counter() - t, 1),
                                            "per_region": region_scores(ws, 0, a.work / f"eval_{name}")}
        results[name] = r | {"bias": a.bias}
        print(f"{name}: {r['epochs']} epochs, {r['iterations']} iterations at {r['seconds_per_iteration']} s/it; "
              f"per region {r['per_region']} ({r['validation_cases']} cases)", flush=True)
    print(json.dumps({"minutes": a.minutes, "bias": a.bias, "cases": a.cases, "filters": base.network.filters,
                      "patch": base.training.patch_size, "loss": dataclasses.asdict(base.training.loss),
                      "variants": results}))


if __name__ == "__main__":
    main()
