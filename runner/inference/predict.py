"""`segplan predict`: segment images with the trained folds, each built from its frozen plan; a
cascade after the stage it builds on (the stages: runner/inference/stages.py)."""
from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from segplan.planner.dataset import Case, DatasetError
from segplan.planner.plan import Plan
from segplan.runner.inference.case import predict_case
from segplan.runner.inference.outputs import admit, refuse_unreadable, report_refused, write_prediction
from segplan.runner.inference.predictor import Predictor
from segplan.runner.inference.stages import make_stage
from segplan.runner.trust.checks import write_features


def predict_cases(cases: list[Case], plan: Plan, models: list, out_dir: Path, tta: bool = True,
                  save_probabilities: bool = False, progress: bool = True, post=None,
                  training_cases: bool = False, output_format: str = "nifti", previous=None,
                  weights: list[Path] | None = None, folds: list[int] | None = None) -> list[dict]:
    """Segment ``cases`` into ``out_dir`` with the averaged models (then ``post``, a Postprocessing,
    if given); returns per-case timings. ``training_cases``: they are the plan's own training cases
    (validation), read in the units its table gives them; new images never are. ``output_format``:
    nifti (``<case>.nii.gz``) or dicom-seg (``<case>.dcm``, DICOM series only). DICOM series that are
    refused are named on stderr, the others predicted, then a DatasetError names their ids.
    ``previous``: a cascade's previous stage (see ``predict_case``). ``weights`` (and ``folds``): the
    models' weights files, beside which ``inference.engine`` keeps their exported network."""
    cases, skipped = admit(cases, output_format, plan)
    predict = make_stage(plan, models, tta, weights=weights, folds=folds).predict
    out_dir.mkdir(parents=True, exist_ok=True)
    timings, features = [], []
    for case in tqdm(cases, desc="predict", disable=not progress, unit="case"):
        try:
            p = predict_case(case, plan, predict, progress, probabilities=save_probabilities,
                             training_case=training_cases, previous=previous, compact=True)   # written as float16
        except DatasetError as e:
            refuse_unreadable(case, e, skipped)
            continue
        timings.append(write_prediction(case, p.labels, p.geometry, p.probabilities, out_dir, post, p.timings,
                                        progress, plan, output_format))
        features.append({"case": case.case_id, **p.features})
        write_features(out_dir, features)   # a fold's validation cases: what summarize fits the QC model on
    report_refused(skipped, len(timings), out_dir)
    return timings


def predict_folder(plan_path: Path, input_dir: Path, output_dir: Path, folds: list[int] | None = None,
                   tta: bool = True, save_probabilities: bool = False, progress: bool = True,
                   postprocessing: bool = True, output_format: str = "nifti") -> list[dict]:
    """`segplan predict PLAN`: every case in ``input_dir`` with the averaged (by default all trained)
    folds, then the postprocessing decided on cross-validation (WORK/postprocessing.yaml) unless told
    not to; a cascade plan's previous stage (its 3d_lowres plan's folds) predicts each case first.
    The same as ``Predictor.from_plan(...).predict_folder(...)``."""
    return Predictor.from_plan(plan_path, folds, tta, postprocessing).predict_folder(
        input_dir, output_dir, save_probabilities, progress, output_format)
