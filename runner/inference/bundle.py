"""A model bundle: everything needed to predict, in one zip that travels to another machine or
hospital without the dataset or the work folder (issue 13).

Layout inside the zip (``BUNDLE_VERSION`` 1: one plan)::

    manifest.json               bundle version, segplan version, folds, SHA-256 of every other file
    folds/K/plan.yaml           fold K's frozen plan (network, preprocessing, labels, channels)
    folds/K/model.weights.h5    the weights its plan's inference.checkpoint names
    postprocessing.yaml         the postprocessing decided on cross-validation, if any
    cv_summary.yaml             the cross-validation report, if any
    calibration.yaml, qc.yaml   calibration and quality model fitted on the folds, if any (runner/trust)
    qc_family.yaml              the training cases' image-feature fences (out-of-family inputs), if any

``ENSEMBLE_BUNDLE_VERSION`` 2, several plans: a cascade with the 3d_lowres stage it builds on, or
`segplan select`'s winning ensemble (`segplan export --selection`)::

    manifest.json               models (name, folds, previous: the model it builds on), ensemble (the
                                models whose probabilities are averaged), SHA-256 of every other file
    models/NAME/folds/K/...     each model's folds, as above
    models/NAME/calibration.yaml, qc.yaml, qc_family.yaml   each model's, as above
    postprocessing.yaml         the postprocessing decided for what is averaged (the selection's, or
                                the cascade plan's), if any
    selection.yaml              the `segplan select` ranking it came from, if any (for reading)

Only YAML (safe loading) and Keras weight files are read from a bundle: nothing is unpickled or
executed. A changed or missing file, a fold without its files, or an unknown bundle version is
refused before any work.
"""
from __future__ import annotations

import dataclasses
import json
import re
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

from segplan.planner.bundle_file import (
    BUNDLE_VERSION, ENSEMBLE_BUNDLE_VERSION, MANIFEST, MAX_MEMBER_MB, BundleError, bundle_models, bundle_plan,
    choose_folds, open_bundle, sha256)
from segplan.planner.fileio import atomic
from segplan.planner.plan_file import save_plan
from segplan.runner.postprocessing import postprocess
from segplan.runner.inference.models import build_models, fold_weights
from segplan.runner.inference.onnx_file import onnx_metadata
from segplan.runner.trust.checks import load_trust, save_family
from segplan.runner.workspace import QC_FAMILY, Workspace

__all__ = ["BundleError", "export", "export_selection", "open_bundle", "bundle_stages"]


def export(plan_path: Path, out: Path, folds: list[int] | None = None) -> Path:
    """Write the bundle of the finished ``folds`` (default: all of the plan's) to ``out``; a cascade's
    bundle holds its previous stage too."""
    ws = Workspace(plan_path)
    extra = {name: path for name, path in (("postprocessing.yaml", ws.postprocessing),
                                           ("cv_summary.yaml", ws.cv_summary_yaml)) if path.exists()}
    return _export([ws], Path(out), folds, extra, {"plan": ws.plan.name})


def export_selection(selection: Path, out: Path, folds: list[int] | None = None) -> Path:
    """`segplan export --selection FILE`: the winner of a `segplan select` (one plan, a cascade, or an
    ensemble) with the postprocessing decided for it, and the prediction settings (engine, overlap,
    mirroring, folds) chosen with it where it has them; `segplan predict --model` predicts as
    `segplan predict --selection` does."""
    from segplan.runner.evaluation.selection import winner_settings, winner_workspaces
    sel, workspaces = winner_workspaces(Path(selection))
    settings = winner_settings(sel)
    if settings is not None and folds is None:
        folds = list(range(settings.folds))
    with tempfile.TemporaryDirectory(prefix="segplan_export_") as staging:
        post = Path(staging) / "postprocessing.yaml"
        postprocess.save(sel.postprocessing, post)
        return _export(workspaces, Path(out), folds, {"postprocessing.yaml": post, "selection.yaml": Path(selection)},
                       {"selection": sel.winner}, settings.inference() if settings else None)


def _bundled_plan(ws: Workspace, k: int, path: Path, previous_stage: str | None = None,
                  inference: dict | None = None) -> None:
    """Fold k's plan as a bundle holds it: the frozen network/preprocessing with the live inference
    settings (or ``inference``'s, a selection's), and nothing of the training machine (no paths, no
    training case ids: the units of the training cases mean nothing to new images)."""
    plan = ws.fold_plan(k)
    if inference:
        plan = plan.replace(inference=dataclasses.replace(plan.inference, **inference))
    save_plan(plan.replace(dataset=dataclasses.replace(plan.dataset, path=".", work_dir=".", splits_file=None),
                           intensity=dataclasses.replace(plan.intensity, conventions={}),
                           previous_stage=previous_stage if plan.configuration == "3d_cascade_fullres" else None),
              path)


def _export(workspaces: list[Workspace], out: Path, folds: list[int] | None, extra: dict[str, Path],
            info: dict, inference: dict | None = None) -> Path:
    """The bundle of ``workspaces`` (averaged) and the stages they build on, with ``extra`` files:
    one plan as BUNDLE_VERSION's folds/K/..., several as ENSEMBLE_BUNDLE_VERSION's models/NAME/folds/K/..."""
    from segplan.runner.evaluation.selection import member_names
    from segplan.runner.cascade import stage_chain
    chain = stage_chain(workspaces)
    for ws, _ in chain:
        chosen = list(range(ws.plan.cross_validation.folds)) if folds is None else list(folds)
        unfinished = [k for k in chosen if not ws.fold(k).is_finished()]
        if unfinished:
            raise BundleError(f"folds {unfinished} have not finished training in {ws.root}: finish them "
                              f"(`segplan run {ws.plan_path} --fold K`) or export --folds with the finished ones")
    names = dict(zip([ws.plan_path.resolve() for ws, _ in chain],
                     [re.sub(r"[^A-Za-z0-9_.-]", "_", n) for n in member_names([ws for ws, _ in chain])]))
    single = len(chain) == 1
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="segplan_export_") as staging:
        files: dict[str, Path] = {}
        models = []
        for ws, prev in chain:
            name = names[ws.plan_path.resolve()]
            prefix = "" if single else f"models/{name}/"
            chosen = list(range(ws.plan.cross_validation.folds)) if folds is None else list(folds)
            prev_name = names[prev.plan_path.resolve()] if prev is not None else None
            for k in chosen:
                staged = Path(staging) / f"{name}_plan_{k}.yaml"
                _bundled_plan(ws, k, staged, f"../../../{prev_name}/folds/{chosen[0]}/plan.yaml" if prev else None,
                              inference)
                files[f"{prefix}folds/{k}/plan.yaml"] = staged
                files[f"{prefix}folds/{k}/model.weights.h5"] = fold_weights(ws.fold_plan(k), ws.fold(k))
            models.append({"name": name, "folds": chosen, "previous": prev_name})
            files |= _trust_files(ws, prefix, Path(staging) / name)
        files |= extra
        manifest = {"bundle_version": BUNDLE_VERSION if single else ENSEMBLE_BUNDLE_VERSION,
                    "segplan_version": metadata.version("segplan"), **info}
        if single:
            manifest |= {"folds": models[0]["folds"], "inference": {"checkpoint": chain[0][0].plan.inference.checkpoint}}
        else:
            manifest |= {"models": models, "ensemble": [names[ws.plan_path.resolve()] for ws in workspaces]}
        manifest["files"] = {name: sha256(path) for name, path in files.items()}
        with atomic(out) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
            for name, path in files.items():
                z.write(path, name)
            z.writestr(MANIFEST, json.dumps(manifest, indent=1))
    return out


def _trust_files(ws: Workspace, prefix: str, staging: Path) -> dict[str, Path]:
    """A model's calibration, quality model and training-family fences, as the bundle holds them
    beside its folds (those it has: predict says what is missing)."""
    files = {f"{prefix}{path.name}": path for path in (ws.calibration, ws.qc_model) if path.exists()}
    staging.mkdir(parents=True, exist_ok=True)
    if save_family(ws, staging / QC_FAMILY):
        files[f"{prefix}{QC_FAMILY}"] = staging / QC_FAMILY
    return files


SERVING_FORMATS = {"savedmodel": "tf_saved_model", "onnx": "onnx"}
ONNX_NEEDS = ("tf2onnx", "onnx")  # what Keras' model.export(format="onnx") needs under TensorFlow


def _onnx_exporter_missing(backend: str) -> str | None:
    """Why ONNX cannot be written here (a sentence saying what to do), or None.

    Only the TensorFlow backend exports this network: under JAX, jax2onnx 0.17 fails on its free
    spatial size and, with a fixed one, on the 3D convolutions' layout; Keras' torch exporter needs
    fixed shapes. The weights are the same under every backend, so a fold trained on JAX or torch
    exports under ``KERAS_BACKEND=tensorflow``."""
    import importlib.util
    if backend != "tensorflow":
        return (f"--format onnx needs the TensorFlow backend (this is {backend}); the weights are the same under "
                "every backend: run `KERAS_BACKEND=tensorflow segplan export ... --format onnx`")
    missing = [m for m in ONNX_NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        return (f"--format onnx needs {' and '.join(missing)}, not installed: pip install 'segplan[onnx]' "
                f"(or pip install {' '.join(missing)})")
    return None


def export_network(plan_path: Path, out: Path, fmt: str, folds: list[int] | None = None) -> list[Path]:
    """The network alone, per fold, for serving stacks: ``out/fold_K`` as a TensorFlow SavedModel, or
    ``out/fold_K.onnx`` (ONNX: the optional ``segplan[onnx]``, i.e. tf2onnx under the default
    TensorFlow backend); what it holds (``onnx_metadata``) in the ONNX file's metadata, or in the
    SavedModel's ``assets.extra/segplan.json``. Input (b, z, y, x, c) float32 (a 2d plan: its two in-plane axes) with free
    spatial size divisible by the pooling; output the softmax (b, z, y, x, classes), or a region
    plan's sigmoids (b, z, y, x, regions), the only output (the network has no deep-supervision
    heads). The preprocessing and the sliding window stay segplan's (or the
    bundle's) job: ``segplan.runner.inference.engines.onnxruntime_predictor`` tiles with an ONNX network as segplan does."""
    if fmt not in SERVING_FORMATS:
        raise ValueError(f"--format {fmt}: one of {', '.join(SERVING_FORMATS)} (or none, for a segplan bundle)")
    if fmt == "onnx":
        from segplan.runner.backend import name as backend_name
        why = _onnx_exporter_missing(backend_name())
        if why:
            raise ValueError(why)
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
            if fmt == "onnx":
                from segplan.runner.inference.onnx_file import export_onnx
                export_onnx(model, plan, k, target)
            else:
                model.export(str(target), format=SERVING_FORMATS[fmt], verbose=False)
                extra = target / "assets.extra"   # TensorFlow Serving's place for files beside the model
                extra.mkdir(exist_ok=True)
                (extra / "segplan.json").write_text(json.dumps(onnx_metadata(plan, k), indent=1))
        except ImportError as e:
            raise ValueError(f"--format {fmt} needs an optional package: {e}") from e
        written.append(target)
    return written


def bundle_stages(bundle: Path, folds: list[int] | None = None, tta: bool = True, postprocessing: bool = True,
                  max_member_mb: float = MAX_MEMBER_MB) -> tuple[list, postprocess.Postprocessing | None, str]:
    """What `segplan predict --model BUNDLE` (and ``Predictor.from_bundle``) predicts with: the
    bundle's folds (or ``folds`` among them) as stages, built in memory from the unpacked bundle (an
    ensemble bundle: each member), its postprocessing unless told not to, and a line saying which."""
    with tempfile.TemporaryDirectory(prefix="segplan_bundle_") as tmp:
        root = Path(tmp)
        manifest = open_bundle(Path(bundle), root, max_member_mb)
        stages = _bundle_stages(Path(bundle), root, manifest, folds, tta)
        post_file = root / "postprocessing.yaml"
        post = postprocess.load(post_file, stages[0].plan.dataset.labels) if postprocessing and post_file.exists() else None
    note = postprocess.note(post, f"{Path(bundle).name}: postprocessing.yaml") if post is not None else ""
    return stages, post, note


def _bundle_stages(bundle: Path, root: Path, manifest: dict, folds: list[int] | None, tta: bool) -> list:
    """The stages the bundle averages, each model built once (an ensemble member may also be a
    cascade's previous stage); a model's weights that do not fit its plan, or a cascade without its
    previous stage (or a previous stage for what is no cascade), refused naming the bundle."""
    from segplan.runner.inference.stages import make_stage
    models, ensemble = bundle_models(manifest)
    built: dict[str, object] = {}

    def load(name: str):
        if name not in built:
            model = models[name]
            chosen = choose_folds(bundle, manifest, folds, model)
            plans = [bundle_plan(bundle, root, k, model["prefix"]) for k in chosen]
            previous = load(model["previous"]) if model["previous"] is not None else None
            if (plans[0].configuration == "3d_cascade_fullres") != (previous is not None):
                raise BundleError(f"{bundle}: model {name} is a '{plans[0].configuration}' plan "
                                  + ("without a previous model" if previous is None else
                                     f"with previous model {model['previous']}") + ": only a 3d_cascade_fullres plan "
                                  "builds on a previous stage")
            try:
                weights = [root / f"{model['prefix']}folds/{k}/model.weights.h5" for k in chosen]
                plan, nets = build_models(plans, weights, chosen)
            except (OSError, ValueError) as e:  # weights that do not fit their plan, or no weights file at all
                raise BundleError(f"{bundle}: {' '.join(str(e).replace(str(root) + '/', '').split())}") from e
            trust = load_trust(root / model["prefix"], lambda: ({}, "the bundle holds no training family (exported "
                                                                 "before segplan kept one, or from a work folder "
                                                                 "without preprocessed cases)"))
            built[name] = make_stage(plan, nets, tta, previous, weights, chosen, trust)  # an engine exports now
        return built[name]
    return [load(name) for name in ensemble]
