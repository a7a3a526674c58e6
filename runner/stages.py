"""Stages: trained configurations ready to predict, alone, chained (a cascade) or averaged (an ensemble).

A stage is one plan's folds, their softmax averaged (and mirrored for test-time augmentation where
its plan says so), and, for a 3d_cascade_fullres plan, the stage it builds on (its 3d_lowres plan's
folds), which predicts each case first. An ensemble, `segplan select`'s winner when two
configurations beat one, averages its members' probabilities as nnU-Net's ensembling does: each
member predicts at its own plan's spacing, its probabilities are resampled back to the input's grid,
the average's argmax is the label map, and the postprocessing decided for the ensemble follows.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from planner.dataset import Case
from planner.plan import Plan
from runner.infer import keras_predictor, mirrored
from runner.predict import load_fold_models, predict_case, write_prediction
from runner.preprocess import classes_to_labels
from runner.workspace import Workspace


@dataclass(frozen=True)
class Stage:
    """One configuration's folds, ready to predict."""

    plan: Plan
    predict: Callable[[np.ndarray], np.ndarray]  # (b, c, *patch) -> (b, classes, *patch)
    previous: "Stage | None" = None              # a cascade's 3d_lowres stage: predicts first


def make_stage(plan: Plan, models: list, tta: bool, previous: Stage | None = None) -> Stage:
    predict = keras_predictor(models)
    if tta and plan.inference.mirroring:
        predict = mirrored(predict, plan.training.augmentation.mirror_axes)
    return Stage(plan, predict, previous)


def workspace_stage(ws: Workspace, folds: list[int] | None = None, tta: bool = True, plan: Plan | None = None,
                    models: list | None = None) -> Stage:
    """The plan's ``folds`` (default: every trained one; ``plan`` and ``models`` if loaded already) as a
    stage; a cascade's previous stage with the same folds (default: every trained one of it), as
    nnU-Net predicts both stages with the same folds."""
    if models is None:
        chosen = folds if folds is not None else [f.index for f in ws.folds() if f.is_trained()]
        if not chosen:
            raise FileNotFoundError(f"no trained fold in {ws.root}; run `segplan run {ws.plan_path} --fold 0` first")
        plan, models = load_fold_models(ws, chosen)
    previous = None
    if ws.plan.configuration == "3d_cascade_fullres":
        from runner.cascade import previous_workspace
        previous = workspace_stage(previous_workspace(ws), folds, tta)
    return make_stage(plan, models, tta, previous)


def previous_labels(stage: Stage) -> Callable[[Case], np.ndarray] | None:
    """case -> the label map ``stage``'s previous stage predicts on the case's grid (after its own
    previous stage, if it has one); None for a stage without one."""
    prev = stage.previous
    if prev is None:
        return None
    return lambda case: predict_case(case, prev.plan, prev.predict, previous=previous_labels(prev))[0]


def predict_ensemble(cases: list[Case], stages: list[Stage], out_dir: Path, save_probabilities: bool = False,
                     progress: bool = True, post=None) -> list[dict]:
    """Segment ``cases`` into ``out_dir`` with the average of the stages' probabilities on each
    case's original grid (one stage: its own prediction), then ``post``; returns per-case timings."""
    first = stages[0].plan
    for s in stages[1:]:
        if s.plan.dataset.labels != first.dataset.labels:
            raise ValueError(f"ensemble members segment other labels: {first.dataset.labels} and "
                             f"{s.plan.dataset.labels}")
    out_dir.mkdir(parents=True, exist_ok=True)
    timings = []
    for case in tqdm(cases, desc="predict", disable=not progress, unit="case"):
        total, t = None, {}
        for stage in stages:
            labels, geom, probs, ts = predict_case(case, stage.plan, stage.predict, progress,
                                                   probabilities=save_probabilities or len(stages) > 1,
                                                   previous=previous_labels(stage))
            for key, v in ts.items():
                t[key] = t.get(key, 0.0) + v
            total = probs if total is None else total + probs
        if len(stages) > 1:
            t0 = time.perf_counter()
            total /= len(stages)
            labels = classes_to_labels(np.argmax(total, axis=0), first)
            t["average_s"] = time.perf_counter() - t0
        timings.append(write_prediction(case.case_id, labels, geom, total if save_probabilities else None, out_dir,
                                        post, t, progress))
    return timings
