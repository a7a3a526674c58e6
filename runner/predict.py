"""`segplan predict`: segment images with the trained folds, each built from its frozen plan; a
cascade after the stage it builds on, an ensemble (`segplan select`'s winner) as nnU-Net ensembles:
each member at its own spacing, its probabilities resampled to the input's grid, averaged, argmax."""
from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from planner.dataset import Case, DatasetError, Geometry
from planner.dicom import dicom_cases, read_case_image
from planner.fileio import ENDINGS, image_files
from planner.plan import Plan, output_channels, volume_patch
from runner import postprocess
from runner.infer import keras_predictor, mirrored, on_windows, sliding_window
from runner.outputs import admit, refuse_unreadable, report_refused, write_prediction
from runner.preprocess import classes_to_labels, invert_probabilities, preprocess_image
from runner.regions import regions_to_labels
from runner.workspace import Fold, Workspace, weight_fields

CHANNEL = re.compile(r"^(.*)_(\d{4})$")


def find_input_cases(folder: Path, n_channels: int) -> list[Case]:
    """Cases of a folder: nnU-Net style ``<case>_0000.nii.gz`` per channel, or one file per case, or
    the DICOM series in it and its subfolders (planner/dicom.py; not mixed with other files)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: no such input folder")
    files = image_files(folder)
    series = dicom_cases(folder, n_channels, files)
    if series:
        return series
    if not files:
        raise DatasetError(f"{folder}: no image files ({', '.join(ENDINGS)}) and no DICOM series")
    if all(CHANNEL.match(stem) for stem in files):
        groups: dict[str, dict[int, Path]] = {}
        for stem, p in files.items():
            m = CHANNEL.match(stem)
            groups.setdefault(m.group(1), {})[int(m.group(2))] = p
        cases = []
        for cid, ch in groups.items():
            if sorted(ch) != list(range(n_channels)):
                raise DatasetError(f"{folder}: case {cid} has channels {sorted(ch)}, the plan needs {list(range(n_channels))}")
            cases.append(Case(cid, tuple(ch[c] for c in range(n_channels)), None))
        return cases
    if n_channels != 1:
        raise DatasetError(f"{folder}: the plan needs {n_channels} channels per case as <case>_0000.. files")
    return [Case(stem, (p,), None) for stem, p in files.items()]


def fold_weights(plan: Plan, fold: Fold) -> Path:
    """The weights file of a fold that ``inference.checkpoint`` names: the final weights (what the
    checkpoint pointer names once training has ended) or the best by the monitored loss."""
    if plan.inference.checkpoint == "best":
        if not fold.best.exists():
            raise FileNotFoundError(f"fold {fold.index}: inference.checkpoint is 'best' but {fold.best} does not exist")
        return fold.best
    return fold.latest_weights()


def selection_note(plan: Plan) -> str:
    """What, if anything, of a fold's training was decided on its validation cases: said beside its numbers."""
    if plan.training.schedule.monitor != "val_loss":
        return ""
    if plan.inference.checkpoint == "best":
        return ("the checkpoint was CHOSEN ON THESE VALIDATION CASES (inference.checkpoint: best, monitor: val_loss): "
                "the figures are optimistic, not a cross-validation estimate")
    return ("the learning-rate plateau and early stopping watched these validation cases (monitor: val_loss): "
            "slightly optimistic")


def build_models(plans: list[Plan], weights: list[Path], folds: list[int]) -> tuple[Plan, list]:
    """One Keras model per fold from its plan and weights file (Keras weights: nothing unpickled or
    executed); the plan to predict with, which the folds' preprocessing and labels must agree on."""
    from runner.model import plan_network, prediction_model
    models = []
    for k, plan, w in zip(folds, plans, weights):
        model = plan_network(plan)
        try:
            model.load_weights(str(w))
        except (OSError, ValueError) as e:  # not a weights file, or the weights of another network
            why = " ".join(str(e).split())  # Keras' message can hold whole tensors: its start says what
            raise ValueError(f"{w}: cannot be loaded as fold {k}'s weights into the network its plan describes "
                             f"({why[:300] + ' ...' if len(why) > 300 else why})") from e
        models.append(prediction_model(model))  # deep supervision's lower outputs trained, never predict
    first = {k: v for k, v in weight_fields(plans[0]).items() if not k.startswith("network.")}
    for k, p in zip(folds[1:], plans[1:]):
        if {a: b for a, b in weight_fields(p).items() if not a.startswith("network.")} != first:
            raise ValueError(f"fold {k} was trained with other preprocessing or labels than fold {folds[0]}: "
                             "predict with one of them (--folds)")
    return plans[0], models


def load_fold_models(ws: Workspace, folds: list[int]) -> tuple[Plan, list]:
    """The folds' models, each built from the fold's frozen plan with the weights that
    ``inference.checkpoint`` names."""
    plans = [ws.fold_plan(k) for k in folds]
    return build_models(plans, [fold_weights(p, ws.fold(k)) for p, k in zip(plans, folds)], folds)


def warn_unknown_units(case: Case, props: dict) -> None:
    """Name each CT input whose values show no known unit: it is read as HU, which may be wrong
    (say, windowed 0..255 stored as 0..1 floats), and nobody would know from the output alone."""
    for c, (conv, why) in enumerate(zip(props["conventions"], props["convention_evidence"])):
        if conv == "unknown":
            path = case.image_files[c] if c < len(case.image_files) else case.image_files[0]
            print(f"segplan: warning: {path}: CT values show no known unit ({why}); read as HU. If it is stored "
                  "otherwise (0..255 windowed, HU + 1024, scaled), convert it to HU and predict again",
                  file=sys.stderr, flush=True)


def predict_case(case: Case, plan: Plan, predict, progress: bool = False, probabilities: bool = False,
                 training_case: bool = False,
                 previous=None) -> tuple[np.ndarray, Geometry, np.ndarray | None, dict]:
    """Label map (original label values) with the input's geometry, the probabilities on the
    original grid if asked for (else None; a region plan's: one sigmoid probability per region), and
    the time of each step. ``training_case``: the case
    is one of the plan's training cases (a fold's validation case), read in the plan's unit for it;
    otherwise the image's own values decide its unit, whatever its name. ``previous`` (a cascade):
    case -> the previous stage's label map on the original grid, added as one-hot input channels."""
    t = {}
    t0 = time.perf_counter()
    image, geom = read_case_image(case)
    if image.shape[0] != len(plan.dataset.channels):
        raise DatasetError(f"{case.image_files[0]}: {image.shape[0]} channels, the plan needs {len(plan.dataset.channels)}")
    data, _, props = preprocess_image(image, geom, plan, case.case_id, training_case=training_case)
    del image
    warn_unknown_units(case, props)
    if previous is not None:
        from runner.cascade import previous_channels
        data = np.concatenate([data, previous_channels(previous(case), props, plan)])
    t["preprocess_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    bar = tqdm(total=None, desc=f"{case.case_id}", disable=not progress, leave=False, unit="window")

    def tick(done, total):
        bar.total = total
        bar.n = done
        bar.refresh()
    window = volume_patch(plan.training.patch_size, plan.slice_axis)  # a 2d plan: one slice deep
    probs = sliding_window(data, window, on_windows(predict, plan.training.patch_size, window),
                           output_channels(plan.dataset), plan.inference.overlap, plan.inference.weighting,
                           plan.inference.batch_size, progress=tick)
    bar.close()
    t["network_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if plan.dataset.regions:  # region probabilities on the original grid, thresholded and written in order
        full = invert_probabilities(probs, props, plan, full=True, background=False)
        labels = labels_of(full, plan)
        full = full if probabilities else None
    elif probabilities:
        full = invert_probabilities(probs, props, plan, full=True)
        labels = labels_of(full, plan)
    else:
        full = None
        labels = classes_to_labels(invert_probabilities(probs, props, plan, full=False), plan)
    t["resample_back_s"] = time.perf_counter() - t0
    return labels, geom, full, t


def labels_of(full: np.ndarray, plan: Plan) -> np.ndarray:
    """The label map of probabilities on the original grid: a region plan's sigmoids thresholded at
    0.5 and written in ``regions_class_order``, or the arg-max class's label value."""
    if plan.dataset.regions:
        order = plan.dataset.regions_class_order
        return regions_to_labels(full, order, np.uint8 if max(order) < 256 else np.uint16)
    return classes_to_labels(np.argmax(full, axis=0), plan)


def predict_cases(cases: list[Case], plan: Plan, models: list, out_dir: Path, tta: bool = True,
                  save_probabilities: bool = False, progress: bool = True, post=None,
                  training_cases: bool = False, output_format: str = "nifti", previous=None) -> list[dict]:
    """Segment ``cases`` into ``out_dir`` with the averaged models (then ``post``, a Postprocessing,
    if given); returns per-case timings. ``training_cases``: they are the plan's own training cases
    (validation), read in the units its table gives them; new images never are. ``output_format``:
    nifti (``<case>.nii.gz``) or dicom-seg (``<case>.dcm``, DICOM series only). DICOM series that are
    refused are named on stderr, the others predicted, then a DatasetError names their ids.
    ``previous``: a cascade's previous stage (see ``predict_case``)."""
    cases, skipped = admit(cases, output_format)
    predict = make_stage(plan, models, tta).predict
    out_dir.mkdir(parents=True, exist_ok=True)
    timings = []
    for case in tqdm(cases, desc="predict", disable=not progress, unit="case"):
        try:
            labels, geom, probs, t = predict_case(case, plan, predict, progress, probabilities=save_probabilities,
                                                  training_case=training_cases, previous=previous)
        except DatasetError as e:
            refuse_unreadable(case, e, skipped)
            continue
        timings.append(write_prediction(case, labels, geom, probs, out_dir, post, t, progress, plan, output_format))
    report_refused(skipped, len(timings), out_dir)
    return timings


def predict_folder(plan_path: Path, input_dir: Path, output_dir: Path, folds: list[int] | None = None,
                   tta: bool = True, save_probabilities: bool = False, progress: bool = True,
                   postprocessing: bool = True, output_format: str = "nifti") -> list[dict]:
    """`segplan predict`: every case in ``input_dir`` with the averaged (by default all trained) folds,
    then the postprocessing decided on cross-validation (WORK/postprocessing.yaml) unless told not to.
    A cascade plan's previous stage (its 3d_lowres plan's folds) predicts each case first."""
    ws = Workspace(plan_path)
    folds = folds if folds is not None else [f.index for f in ws.folds() if f.is_trained()]
    if not folds:
        raise FileNotFoundError(f"no trained fold in {ws.root}; run `segplan run` first")
    plan, models = load_fold_models(ws, folds)
    cases = find_input_cases(input_dir, len(plan.dataset.channels))
    post = (postprocess.load(ws.postprocessing, plan.dataset.labels)
            if postprocessing and ws.postprocessing.exists() else None)
    if post is not None:
        print(f"postprocessing: {', '.join(r.keep_largest for r in post.rules) or 'none'} ({ws.postprocessing})")
    previous = None
    if ws.plan.configuration == "3d_cascade_fullres":
        previous = previous_labels(workspace_stage(ws, folds, tta, plan=plan, models=models))
    return predict_cases(cases, plan, models, Path(output_dir), tta, save_probabilities, progress, post,
                         output_format=output_format, previous=previous)


# Stages: a configuration's folds ready to predict, alone, chained (a cascade) or averaged (an ensemble).

@dataclass(frozen=True)
class Stage:
    """One configuration's folds, ready to predict."""

    plan: Plan
    predict: Callable[[np.ndarray], np.ndarray]  # (b, c, *patch) -> (b, classes, *patch)
    previous: "Stage | None" = None              # a cascade's 3d_lowres stage: predicts first


def make_stage(plan: Plan, models: list, tta: bool, previous: Stage | None = None) -> Stage:
    """The plan's models as a predictor, mirrored at test time where the plan says so; a plan (or a
    bundle's) from before mirroring followed training's mirror_p is used as written, with the
    warning `segplan check` gives, on stderr."""
    predict = keras_predictor(models)
    if tta and plan.inference.mirroring:
        from planner.planning import mirroring_lines
        for line in mirroring_lines(plan):
            print(f"segplan: warning: plan '{plan.name}': {line.strip().removeprefix('WARNING: ')} "
                  "(`segplan predict --no-tta` predicts unmirrored)", file=sys.stderr, flush=True)
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
                     progress: bool = True, post=None, output_format: str = "nifti") -> list[dict]:
    """Segment ``cases`` into ``out_dir`` with the average of the stages' probabilities on each
    case's original grid (one stage: its own prediction), then ``post``; returns per-case timings.
    DICOM series and ``output_format`` as in ``predict_cases``."""
    first = stages[0].plan
    for s in stages[1:]:
        if s.plan.dataset.labels != first.dataset.labels or s.plan.dataset.regions != first.dataset.regions:
            raise ValueError(f"ensemble members segment other labels: {first.dataset.labels} and "
                             f"{s.plan.dataset.labels}")
    cases, skipped = admit(cases, output_format)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings = []
    for case in tqdm(cases, desc="predict", disable=not progress, unit="case"):
        total, t = None, {}
        try:
            for stage in stages:
                labels, geom, probs, ts = predict_case(case, stage.plan, stage.predict, progress,
                                                       probabilities=save_probabilities or len(stages) > 1,
                                                       previous=previous_labels(stage))
                for key, v in ts.items():
                    t[key] = t.get(key, 0.0) + v
                total = probs if total is None else total + probs
        except DatasetError as e:
            refuse_unreadable(case, e, skipped)
            continue
        if len(stages) > 1:
            t0 = time.perf_counter()
            total /= len(stages)
            labels = labels_of(total, first)
            t["average_s"] = time.perf_counter() - t0
        timings.append(write_prediction(case, labels, geom, total if save_probabilities else None, out_dir,
                                        post, t, progress, first, output_format))
    report_refused(skipped, len(timings), out_dir)
    return timings
