"""A model bundle: everything needed to predict, in one zip that travels to another machine or
hospital without the dataset or the work folder (issue 13).

Layout inside the zip (``BUNDLE_VERSION`` 1)::

    manifest.json               bundle version, segplan version, folds, SHA-256 of every other file
    folds/K/plan.yaml           fold K's frozen plan (network, preprocessing, labels, channels)
    folds/K/model.weights.h5    the weights its plan's inference.checkpoint names
    postprocessing.yaml         the postprocessing decided on cross-validation, if any
    cv_summary.yaml             the cross-validation report, if any

Only YAML (safe loading) and Keras weight files are read from a bundle: nothing is unpickled or
executed. A changed or missing file, a fold without its files, or an unknown bundle version is
refused before any work.
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

from planner.bundle_file import (BUNDLE_VERSION, MANIFEST, MAX_MEMBER_MB, BundleError, bundle_plan, choose_folds,
                                 open_bundle, sha256)
from planner.fileio import atomic
from planner.plan_file import save_plan
from runner import postprocess
from runner.predict import build_models, find_input_cases, fold_weights, predict_cases
from runner.workspace import Workspace

__all__ = ["BundleError", "export", "open_bundle", "predict_with_bundle"]


def export(plan_path: Path, out: Path, folds: list[int] | None = None) -> Path:
    """Write the bundle of the finished ``folds`` (default: all of the plan's) to ``out``."""
    ws = Workspace(plan_path)
    folds = list(range(ws.plan.cross_validation.folds)) if folds is None else list(folds)
    unfinished = [k for k in folds if not ws.fold(k).is_finished()]
    if unfinished:
        raise BundleError(f"folds {unfinished} have not finished training in {ws.root}: finish them "
                          f"(`segplan run {plan_path} --fold K`) or export --folds with the finished ones")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="segplan_export_") as staging:
        files: dict[str, Path] = {}
        for k in folds:
            plan = ws.fold_plan(k)  # the frozen network/preprocessing with the live inference settings
            files[f"folds/{k}/plan.yaml"] = Path(staging) / f"plan_{k}.yaml"
            # no training case ids: the units of the training cases mean nothing to new images
            save_plan(plan.replace(dataset=dataclasses.replace(plan.dataset, path=".", work_dir=".", splits_file=None),
                                   intensity=dataclasses.replace(plan.intensity, conventions={})),
                      files[f"folds/{k}/plan.yaml"])
            files[f"folds/{k}/model.weights.h5"] = fold_weights(plan, ws.fold(k))
        for name, path in (("postprocessing.yaml", ws.postprocessing), ("cv_summary.yaml", ws.cv_summary_yaml)):
            if path.exists():
                files[name] = path
        manifest = {"bundle_version": BUNDLE_VERSION, "segplan_version": metadata.version("segplan"),
                    "plan": ws.plan.name, "folds": folds, "inference": {"checkpoint": ws.plan.inference.checkpoint},
                    "files": {name: sha256(path) for name, path in files.items()}}
        with atomic(out) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
            for name, path in files.items():
                z.write(path, name)
            z.writestr(MANIFEST, json.dumps(manifest, indent=1))
    return out


SERVING_FORMATS = {"savedmodel": "tf_saved_model", "onnx": "onnx"}


def export_network(plan_path: Path, out: Path, fmt: str, folds: list[int] | None = None) -> list[Path]:
    """The network alone, per fold, for serving stacks: ``out/fold_K`` as a TensorFlow SavedModel, or
    ``out/fold_K.onnx`` (ONNX needs the optional tf2onnx). Input (b, z, y, x, c) float32 with
    free spatial size divisible by the pooling; output the softmax (b, z, y, x, classes). The
    preprocessing and the sliding window stay segplan's (or the bundle's) job."""
    if fmt not in SERVING_FORMATS:
        raise ValueError(f"--format {fmt}: one of {', '.join(SERVING_FORMATS)} (or none, for a segplan bundle)")
    ws = Workspace(plan_path)
    folds = [f.index for f in ws.folds() if f.is_finished()] if folds is None else list(folds)
    if not folds:
        raise BundleError(f"no finished fold in {ws.root} to export")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for k in folds:
        fold_plan = ws.fold_plan(k)
        plan, (model,) = build_models([fold_plan], [fold_weights(fold_plan, ws.fold(k))], [k])
        name = ws.fold(k).dir.name  # fold_K, as in the work folder
        target = out / (f"{name}.onnx" if fmt == "onnx" else name)
        try:
            model.export(str(target), format=SERVING_FORMATS[fmt], verbose=False)
        except ImportError as e:
            raise ValueError(f"--format {fmt} needs an optional package: {e}") from e
        written.append(target)
    return written


def predict_with_bundle(bundle: Path, input_dir: Path, output_dir: Path, folds: list[int] | None = None,
                        tta: bool = True, save_probabilities: bool = False, postprocessing: bool = True,
                        progress: bool = True, max_member_mb: float = MAX_MEMBER_MB) -> list[dict]:
    """`segplan predict --model BUNDLE`: the bundle's folds (or ``folds`` among them), averaged, on
    every case of ``input_dir``; the same options, and the same result, as `segplan predict PLAN`."""
    with tempfile.TemporaryDirectory(prefix="segplan_bundle_") as tmp:
        root = Path(tmp)
        manifest = open_bundle(Path(bundle), root, max_member_mb)
        folds = choose_folds(Path(bundle), manifest, folds)
        plans = [bundle_plan(Path(bundle), root, k) for k in folds]
        cases = find_input_cases(input_dir, len(plans[0].dataset.channels))  # wrong channel count: refused here
        try:
            plan, models = build_models(plans, [root / f"folds/{k}/model.weights.h5" for k in folds], folds)
        except (OSError, ValueError) as e:  # weights that do not fit their plan, or are no weights file at all
            raise BundleError(f"{bundle}: {' '.join(str(e).replace(str(root) + '/', '').split())}") from e
        post_file = root / "postprocessing.yaml"
        post = postprocess.load(post_file, plan.dataset.labels) if postprocessing and post_file.exists() else None
        if post is not None:
            print(f"postprocessing: {', '.join(r.keep_largest for r in post.rules) or 'none'} "
                  f"({Path(bundle).name}: postprocessing.yaml)")
        return predict_cases(cases, plan, models, Path(output_dir), tta, save_probabilities, progress, post)
