"""`segplan predict` and the prediction of a fold's validation cases after training."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from planner.dataset import ENDINGS, Case, DatasetError, Geometry, geometry_of, load_dataset, read_image, write_volume
from planner.plan import Plan, load_plan
from runner.infer import keras_predictor, mirrored, sliding_window
from runner.preprocess import classes_to_labels, invert_probabilities, preprocess_image


def find_input_cases(folder: Path, n_channels: int) -> list[Case]:
    """Cases of a folder: nnU-Net style ``<case>_0000.nii.gz`` per channel, or one file per case."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: no such input folder")
    files = [p for p in sorted(folder.iterdir()) if any(p.name.endswith(e) for e in ENDINGS) and not p.name.startswith(".")]
    if not files:
        raise DatasetError(f"{folder}: no image files ({', '.join(ENDINGS)})")
    pat = re.compile(r"^(.*)_(\d{4})(" + "|".join(re.escape(e) for e in ENDINGS) + ")$")
    groups: dict[str, dict[int, Path]] = {}
    if all(pat.match(p.name) for p in files):
        for p in files:
            m = pat.match(p.name)
            groups.setdefault(m.group(1), {})[int(m.group(2))] = p
        cases = []
        for cid, ch in groups.items():
            if sorted(ch) != list(range(n_channels)):
                raise DatasetError(f"{folder}: case {cid} has channels {sorted(ch)}, the plan needs {list(range(n_channels))}")
            cases.append(Case(cid, tuple(ch[c] for c in range(n_channels)), None))
        return cases
    if n_channels != 1:
        raise DatasetError(f"{folder}: the plan needs {n_channels} channels per case as <case>_0000.. files")
    return [Case(next(p.name[: -len(e)] for e in ENDINGS if p.name.endswith(e)), (p,), None) for p in files]


def fold_weights(plan: Plan, fold_dir: Path, fold: int) -> Path:
    """The weights file of a fold that ``inference.checkpoint`` names: the final weights (what the
    checkpoint pointer names once training has ended) or the best by the monitored loss."""
    from runner.checkpoint import BEST, POINTER
    if plan.inference.checkpoint == "best":
        best = fold_dir / BEST
        if not best.exists():
            raise FileNotFoundError(f"fold {fold}: inference.checkpoint is 'best' but {best} does not exist")
        return best
    pointer = fold_dir / POINTER
    if not pointer.exists():
        raise FileNotFoundError(f"fold {fold} has no checkpoint in {fold_dir}; run `segplan run PLAN --fold {fold}` first")
    return fold_dir / json.loads(pointer.read_text())["weights"]


def selection_note(plan: Plan) -> str:
    """What, if anything, of a fold's training was decided on its validation cases: said beside its numbers."""
    sched = plan.training.schedule
    if sched.monitor != "val_loss":
        return ""
    if plan.inference.checkpoint == "best":
        return ("the checkpoint was CHOSEN ON THESE VALIDATION CASES (inference.checkpoint: best, monitor: val_loss): "
                "the figures are optimistic, not a cross-validation estimate")
    return ("the learning-rate plateau and early stopping watched these validation cases (monitor: val_loss): "
            "slightly optimistic")


def load_fold_models(plan: Plan, base: Path, folds: list[int]):
    """One Keras model per fold, with the weights ``inference.checkpoint`` names."""
    from runner.model import build_unet
    models = []
    for k in folds:
        weights = fold_weights(plan, base / plan.dataset.work_dir / f"fold_{k}", k)
        model = build_unet(plan.network, len(plan.dataset.channels), len(plan.dataset.labels))
        model.load_weights(str(weights))
        models.append(model)
    return models


def predict_case(case: Case, plan: Plan, predict, progress: bool = False,
                 probabilities: bool = False) -> tuple[np.ndarray, Geometry, np.ndarray | None, dict]:
    """Label map (original label values) with the input's geometry, the probabilities on the
    original grid if asked for (else None), and the time of each step."""
    t = {}
    t0 = time.perf_counter()
    image, geom = read_image(case)
    if image.shape[0] != len(plan.dataset.channels):
        raise DatasetError(f"{case.image_files[0]}: {image.shape[0]} channels, the plan needs {len(plan.dataset.channels)}")
    data, _, props = preprocess_image(image, geom, plan, case.case_id)
    del image
    t["preprocess_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    bar = tqdm(total=None, desc=f"{case.case_id}", disable=not progress, leave=False, unit="window")

    def tick(done, total):
        bar.total = total
        bar.n = done
        bar.refresh()
    probs = sliding_window(data, plan.training.patch_size, predict, len(plan.dataset.labels), plan.inference.overlap,
                           plan.inference.weighting, plan.inference.batch_size, progress=tick)
    bar.close()
    t["network_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if probabilities:
        full = invert_probabilities(probs, props, plan, full=True)
        labels = classes_to_labels(np.argmax(full, axis=0), plan)
    else:
        full = None
        labels = classes_to_labels(invert_probabilities(probs, props, plan, full=False), plan)
    t["resample_back_s"] = time.perf_counter() - t0
    return labels, geom, full, t


def predict_folder(plan_path: Path, input_dir: Path, output_dir: Path, folds: list[int] | None = None,
                   tta: bool = True, save_probabilities: bool = False, progress: bool = True) -> list[dict]:
    """Segment every case in ``input_dir`` with the averaged folds; returns per-case timings."""
    plan = load_plan(plan_path)
    base = Path(plan_path).parent
    cases = find_input_cases(input_dir, len(plan.dataset.channels))
    folds = folds if folds is not None else _finished_folds(plan, base)
    if not folds:
        raise FileNotFoundError(f"no trained fold in {base / plan.dataset.work_dir}; run `segplan run` first")
    return _predict_cases(cases, plan, load_fold_models(plan, base, folds), Path(output_dir), tta, save_probabilities, progress)


def _predict_cases(cases, plan, models, out_dir: Path, tta: bool, save_probabilities: bool, progress: bool) -> list[dict]:
    predict = keras_predictor(models)
    if tta and plan.inference.mirroring:
        predict = mirrored(predict, plan.training.augmentation.mirror_axes)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings = []
    for case in tqdm(cases, desc="predict", disable=not progress, unit="case"):
        labels, geom, probs, t = predict_case(case, plan, predict, progress, probabilities=save_probabilities)
        t0 = time.perf_counter()
        write_volume(labels, geom, out_dir / f"{case.case_id}.nii.gz")
        if save_probabilities:
            tmp = out_dir / f".tmp_{case.case_id}.npz"
            np.savez_compressed(tmp, probabilities=probs.astype(np.float16))
            tmp.replace(out_dir / f"{case.case_id}.npz")
        t["write_s"] = time.perf_counter() - t0
        timings.append({"case": case.case_id, **t})
    return timings


def _finished_folds(plan: Plan, base: Path) -> list[int]:
    work = base / plan.dataset.work_dir
    return [k for k in range(plan.cross_validation.folds) if (work / f"fold_{k}" / "checkpoint_latest.json").exists()]


def predict_validation(plan_path: Path, fold: int, progress: bool = True) -> str:
    """Predict the fold's validation cases into WORK/fold_K/validation/ and evaluate them."""
    from runner.evaluate import evaluate_folder
    from runner.train import fold_splits
    plan = load_plan(plan_path)
    base = Path(plan_path).parent
    val_ids = set(fold_splits(plan, base)[fold]["val"])
    ds = load_dataset(base / plan.dataset.path)
    cases = [Case(c.case_id, c.image_files, None) for c in ds.cases if c.case_id in val_ids]
    out = base / plan.dataset.work_dir / f"fold_{fold}" / "validation"
    _predict_cases(cases, plan, load_fold_models(plan, base, [fold]), out, True, False, progress)
    ref_dir = out / "reference"
    ref_dir.mkdir(exist_ok=True)
    for c in ds.cases:  # links to the references, so `segplan evaluate` can be re-run on the folder
        if c.case_id in val_ids:
            link = ref_dir / f"{c.case_id}.nii.gz"
            if not link.exists():
                link.symlink_to(Path(c.label_file).resolve())
    notes = {"checkpoint": plan.inference.checkpoint, "monitor": plan.training.schedule.monitor,
             "selection_note": selection_note(plan)}
    summary = evaluate_folder(out, ref_dir, None, labels=plan.dataset.labels, groups=plan.dataset.label_groups,
                              notes=notes)
    print(f"fold {fold} validation ({len(cases)} cases):\n{summary}")
    return summary
