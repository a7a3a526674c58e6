"""Sparse annotations vs dense at the same CPU training budget (issue 24): the same plan trained on a
dataset whose label maps are annotated on every fourth axial slice only (the other slices are the
ignore label) and on the dense original; both scored on the DENSE references of the same
validation cases.

    python benchmarks/sparse_labels.py [--minutes 5] [--cases 60] [--work /tmp/sparse_labels]
    python benchmarks/sparse_labels.py --minutes 0.5 --cases 12 --no-probe   # a quick check

Takes the first ``--cases`` cases of ../shared/data/Dataset004_Hippocampus (or ``--data``, any
nnU-Net raw dataset) as links, writes the sparse copy (labels kept on slices every//2, every//2 +
every, ...; every other voxel set to the ignore label, one above the highest label, declared as
``"ignore"`` in its dataset.json), plans the dense copy once for this CPU with ``--time-budget
MINUTES``, and writes that plan twice: as it is, and pointing at the sparse copy with
``dataset.ignore_label`` set (nothing else differs: network, patch, batch, schedule, seed, split).
Fold 0 of each is trained and its validation cases predicted with the final weights; both are
then evaluated against the dense labels. Prints the share of annotated voxels, the mean Dice per
class of each variant on the dense references and the difference, and one JSON line with all of
it. The budget is wall time: run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import HIPPOCAMPUS as DATA  # noqa: E402

EVERY = 4


def sparsify(label: np.ndarray, every: int, ignore: int) -> np.ndarray:
    """``label`` kept on the axial slices every // 2, every // 2 + every, ... (axis 0, z), the ignore
    value everywhere else: what an annotator who draws every ``every``-th slice leaves."""
    out = np.full_like(label, ignore)
    out[every // 2::every] = label[every // 2::every]
    return out


def sparse_copy(src: Path, out: Path, every: int = EVERY) -> tuple[Path, int, float]:
    """A copy of the nnU-Net dataset ``src`` (images linked) whose label maps are ``sparsify``-ed,
    with ``"ignore"`` (one above the highest label) in its dataset.json; returns (folder, ignore
    value, share of annotated voxels over all label voxels)."""
    from segplan.planner.layouts import load_dataset
    from segplan.planner.dataset import read_label, write_volume
    from segplan.planner.fileio import write_json
    ds = load_dataset(src)
    ignore = max(ds.labels.values()) + 1
    meta = json.loads((Path(src) / "dataset.json").read_text())
    meta["labels"] = dict(meta["labels"]) | {"ignore": ignore}
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    write_json(out / "dataset.json", meta, indent=2)
    annotated = total = 0
    for case in ds.cases:
        for img in case.image_files:
            link = out / "imagesTr" / img.name
            if not link.exists():
                link.symlink_to(Path(img).resolve())
        label, geom = read_label(case.label_file)
        sparse = sparsify(label, every, ignore)
        write_volume(sparse, geom, out / "labelsTr" / case.label_file.name)
        annotated += int(np.count_nonzero(sparse != ignore))
        total += sparse.size
    return out, ignore, annotated / max(total, 1)


def dense_scores(ws, fold: int, dense_labels: Path, out: Path) -> dict:
    """Mean Dice per class of the fold's validation predictions against the dense label maps
    (evaluated in ``out``, which links both, so the fold's own summary stays as it is)."""
    from segplan.planner.fileio import image_files
    from segplan.planner.labels import LabelModel
    from segplan.runner.evaluation.evaluate import evaluate_folder
    preds = image_files(ws.fold(fold).validation)
    for sub, files in (("pred", preds), ("ref", {c: dense_labels / p.name for c, p in preds.items()})):
        (out / sub).mkdir(parents=True, exist_ok=True)
        for p in files.values():
            link = out / sub / p.name
            link.unlink(missing_ok=True)
            link.symlink_to(Path(p).resolve())
    evaluate_folder(out / "pred", out / "ref", lm=LabelModel(ws.plan.dataset.labels))  # dense references: all scored
    import yaml
    summary = yaml.safe_load((out / "pred" / "summary.yaml").read_text())
    return {c: round(v["dice"]["mean"], 4) for c, v in summary["classes"].items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=5.0, help="training budget of each variant")
    ap.add_argument("--cases", type=int, default=60, help="cases of the dataset used (its first ones)")
    ap.add_argument("--every", type=int, default=EVERY, help="annotate every this-many-th slice")
    ap.add_argument("--work", type=Path, default=Path("/tmp/sparse_labels"))
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--no-probe", action="store_true", help="skip the planner's width probe")
    a = ap.parse_args()
    import dataclasses

    import keras
    from benchmarks.deep_supervision import fold_figures, subset
    from segplan.planner.plan_file import load_plan, save_plan
    from segplan.planner.planning import plan_dataset
    from segplan.runner.pipeline import run_fold
    from segplan.runner.workspace import Workspace
    dense = subset(a.data, a.work / "dense", a.cases)
    sparse, ignore, share = sparse_copy(dense, a.work / "sparse", a.every)
    print(f"sparse copy: every {a.every}th slice annotated, {share:.1%} of the label voxels; ignore label {ignore}")
    base_path = a.work / f"dense_{a.minutes:g}min.yaml"
    plan_dataset(dense, base_path, device="cpu", time_budget=a.minutes, force=True, progress=False,
                 probe=not a.no_probe)
    base = load_plan(base_path)
    variants = {"dense": base,
                "sparse": base.replace(name=f"{base.name}_sparse", dataset=dataclasses.replace(
                    base.dataset, path="sparse", work_dir=f"{base.dataset.work_dir}_sparse", ignore_label=ignore))}
    results = {}
    for name, plan in variants.items():
        path = a.work / f"{name}.yaml"
        save_plan(plan, path)
        ws = Workspace(path)
        keras.backend.clear_session()
        t = time.perf_counter()
        run_fold(ws, 0, restart=True, progress=False)
        results[name] = (fold_figures(ws, 0, ws.plan) | {"run_seconds": round(time.perf_counter() - t, 1)}
                         | {"dice_on_dense_references": dense_scores(ws, 0, dense / "labelsTr", a.work / f"eval_{name}")})
        r = results[name]
        print(f"{name}: {r['epochs']} epochs, {r['iterations']} iterations at {r['seconds_per_iteration']} s/it; "
              f"Dice on the dense references {r['dice_on_dense_references']} ({r['validation_cases']} cases)",
              flush=True)
    gap = {c: round(results["dense"]["dice_on_dense_references"][c] - v, 4)
           for c, v in results["sparse"]["dice_on_dense_references"].items()}
    print(f"dense - sparse Dice: {gap} with {share:.1%} of the voxels annotated")
    print(json.dumps({"minutes": a.minutes, "cases": a.cases, "every": a.every, "annotated_share": round(share, 4),
                      "filters": base.network.filters, "patch": base.training.patch_size, "gap": gap,
                      "variants": results}))


if __name__ == "__main__":
    main()
