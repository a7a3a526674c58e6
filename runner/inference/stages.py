"""Stages: a configuration's folds ready to predict, alone, chained (a cascade) or averaged (an
ensemble, nnU-Net's way: each member at its own spacing, its probabilities resampled to the input's
grid, averaged, argmax)."""
from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from segplan.planner.dataset import Case, DatasetError
from segplan.planner.dicom import read_case_image
from segplan.planner.plan import Plan
from segplan.runner.inference.engines import engine_predictor
from segplan.runner.inference.infer import mirrored
from segplan.planner.labels import label_model
from segplan.runner.inference.case import CasePrediction, predict_image
from segplan.runner.inference.models import fold_weights_files, load_fold_models
from segplan.runner.inference.outputs import admit, refuse_unreadable, report_refused, write_prediction
from segplan.runner.trust.checks import Trust, check_case, say_flagged, workspace_trust, write_qc
from segplan.runner.trust.features import volume_features
from segplan.runner.workspace import Workspace


@dataclass(frozen=True)
class Stage:
    """One configuration's folds, ready to predict."""

    plan: Plan
    predict: Callable[[np.ndarray], np.ndarray]  # (b, c, *patch) -> (b, classes, *patch)
    previous: "Stage | None" = None              # a cascade's 3d_lowres stage: predicts first
    trust: Trust = Trust()                       # calibration, quality model, training family (runner/trust)


def make_stage(plan: Plan, models: list, tta: bool, previous: Stage | None = None,
               weights: list[Path] | None = None, folds: list[int] | None = None, trust: Trust = Trust()) -> Stage:
    """The plan's models as a predictor on its ``inference.engine`` (``weights``: the models' weights
    files, beside which an engine keeps their exported network; without them it exports for this
    process only), mirrored at test time where the plan says so; a plan (or a bundle's) from before
    mirroring followed training's mirror_p is used as written, with the warning `segplan check`
    gives, on stderr."""
    predict = engine_predictor(plan, models, weights, folds)
    if tta and plan.inference.mirroring:
        from segplan.planner.planning import mirroring_lines
        for line in mirroring_lines(plan):
            print(f"segplan: warning: plan '{plan.name}': {line.strip().removeprefix('WARNING: ')} "
                  "(`segplan predict --no-tta` predicts unmirrored)", file=sys.stderr, flush=True)
        predict = mirrored(predict, plan.training.augmentation.mirror_axes)
    return Stage(plan, predict, previous, trust)


def trained_folds(ws: Workspace, folds: list[int] | None = None) -> list[int]:
    """``folds``, or every trained fold of the plan; none at all is refused, saying what to run."""
    chosen = folds if folds is not None else [f.index for f in ws.folds() if f.is_trained()]
    if not chosen:
        raise FileNotFoundError(f"no trained fold in {ws.root}; run `segplan run {ws.plan_path} --fold 0` first")
    return chosen


def workspace_stage(ws: Workspace, folds: list[int] | None = None, tta: bool = True,
                    inference: dict | None = None) -> Stage:
    """The plan's ``folds`` (default: every trained one) as a stage; a cascade's previous stage with
    the same ``folds`` (default: every trained one of it), as nnU-Net predicts both stages with the
    same folds. ``inference``: plan ``inference`` keys to predict with instead of the plan's (a
    selection's settings), for both stages of a cascade."""
    chosen = trained_folds(ws, folds)
    plan, models = load_fold_models(ws, chosen)
    if inference:
        plan = plan.replace(inference=dataclasses.replace(plan.inference, **inference))
    previous = None
    if ws.plan.configuration == "3d_cascade_fullres":
        from segplan.runner.cascade import previous_workspace
        previous = workspace_stage(previous_workspace(ws), folds, tta, inference)
    return make_stage(plan, models, tta, previous, fold_weights_files(ws, chosen), chosen, workspace_trust(ws))


def check_members(stages: list[Stage]) -> None:
    """An ensemble's members must output the same labels (and regions, in the same order) to be averaged."""
    first = label_model(stages[0].plan)
    for s in stages[1:]:
        other = label_model(s.plan)
        if not other.same_outputs(first):
            raise ValueError(f"ensemble members segment other labels: {first.describe()} and {other.describe()}")


def _previous_map(stage: Stage, read, case_id: str, sources: tuple, training_case: bool = False):
    """() -> the label map ``stage``'s previous stage predicts for the same image (after its own
    previous stage, if it has one); None for a stage without one."""
    prev = stage.previous
    if prev is None:
        return None
    return lambda: predict_image(read, case_id, sources, prev.plan, prev.predict, training_case=training_case,
                                 previous=_previous_map(prev, read, case_id, sources, training_case)).labels


def predict_with_stages(stages: list[Stage], read, case_id: str, sources: tuple, progress: bool = False,
                        probabilities: bool = False, training_case: bool = False,
                        compact: bool = False) -> CasePrediction:
    """One image's label map on its own grid from the average of the stages' probabilities (one
    stage: its own prediction), with the grid's geometry, the probabilities if asked for (each
    stage's calibrated where it has a calibration, then averaged; the label map always comes from
    the uncalibrated average), the time of each step and the quality features (the first stage's
    image and entropy, the volumes of the label map): what `segplan predict` and
    ``Predictor.predict`` both compute for a case. ``read``: () -> a fresh (c, z, y, x) image and
    its geometry, called by each stage (and each previous stage of a cascade): preprocessing changes
    the image it is given. ``training_case``: one of the plans' training cases (read in the plan's
    unit for it, as validation reads it). ``compact``: a single stage's probabilities in float16
    (for writing; the label map is the float32 one either way); an ensemble averages in float32, and
    a calibration works on float32 (its clip before the log, 1e-7, is below float16's smallest
    values: a sure background would gain a visible share of each class)."""
    total, calibrated, t, features = None, None, {}, None
    lm = label_model(stages[0].plan)
    calibrate = probabilities and any(s.trust.temperature is not None for s in stages)
    for stage in stages:
        p = predict_image(read, case_id, sources, stage.plan, stage.predict, progress,
                          probabilities=probabilities or len(stages) > 1, training_case=training_case,
                          previous=_previous_map(stage, read, case_id, sources, training_case),
                          compact=compact and len(stages) == 1 and not calibrate)
        for key, v in p.timings.items():
            t[key] = t.get(key, 0.0) + v
        features = p.features if features is None else features
        labels, geom = p.labels, p.geometry
        total = p.probabilities if total is None else total + p.probabilities
        if calibrate:   # an uncalibrated member is averaged as it is; one stage: its labels are made already
            cal = stage.trust.calibrate(p.probabilities, p.labels, lm, in_place=len(stages) == 1)
            calibrated = cal if calibrated is None else calibrated + cal
    if len(stages) > 1:
        t0 = time.perf_counter()
        total /= len(stages)
        labels = lm.to_label_map(total)
        features = features | volume_features(labels, geom.spacing, lm)
        if calibrated is not None:
            calibrated /= len(stages)
        t["average_s"] = time.perf_counter() - t0
    out = calibrated if calibrated is not None else total
    return CasePrediction(labels, geom, out if probabilities else None, t, features)


def stages_trust(stages: list[Stage]) -> Trust:
    """What checks an ensemble's (or one stage's) predictions: the first stage's family fences; its
    quality model only for a single stage (it was fitted on that plan's own predictions)."""
    first = stages[0].trust
    if len(stages) == 1:
        return first
    return Trust(None, None, first.fences, [m for m in first.missing if "QC model" not in m]
                 + ["an ensemble has no QC model (each was fitted on one plan's predictions): the score is "
                    "1 - the first member's mean entropy, not fitted to Dice"])


def predict_ensemble(cases: list[Case], stages: list[Stage], out_dir: Path, save_probabilities: bool = False,
                     progress: bool = True, post=None, output_format: str = "nifti") -> list[dict]:
    """Segment ``cases`` into ``out_dir`` with the average of the stages' probabilities on each
    case's original grid (one stage: its own prediction), then ``post``; returns per-case timings.
    DICOM series and ``output_format`` as in ``predict_cases``."""
    check_members(stages)
    cases, skipped = admit(cases, output_format, stages[0].plan)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings, qc, features = [], [], []
    trust = stages_trust(stages)
    for case in tqdm(cases, desc="predict", disable=not progress, unit="case"):
        try:
            p = predict_with_stages(stages, lambda: read_case_image(case), case.case_id, case.image_files, progress,
                                    save_probabilities, compact=True)   # written as float16
        except DatasetError as e:
            refuse_unreadable(case, e, skipped)
            continue
        timings.append(write_prediction(case, p.labels, p.geometry, p.probabilities, out_dir, post, p.timings,
                                        progress, stages[0].plan, output_format))
        qc.append(check_case(case.case_id, p.features, trust))
        features.append({"case": case.case_id, **p.features})
        write_qc(out_dir, qc, features)
    if qc:
        say_flagged(qc, out_dir)
    report_refused(skipped, len(timings), out_dir)
    return timings
