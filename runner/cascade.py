"""The cascade's runner side (nnU-Net's 3d_cascade_fullres): a full-resolution stage whose network
also sees the prediction of a 3d_lowres stage, one-hot (a channel per foreground class, as nnU-Net's
``MoveSegAsOneHotToData``), as extra input channels.

- Before training, every fold of the low-resolution plan (``previous_stage``, a plan file relative to
  the cascade's) must have finished with its out-of-fold predictions (``check_previous_stage`` refuses
  naming the `segplan run` to do), and the two plans must share labels and split.
- Training: each case's OUT-OF-FOLD low-resolution prediction (predicted by the low-resolution fold
  that held it out: ``LOWRES_WORK/fold_K/validation/<case>.nii.gz``), cropped and resampled to the
  cascade's preprocessed grid as a reference label map is (``previous_stage_maps``: WORK/previous_stage/,
  remade when the prediction it came from changes). A patch carries its crop through the spatial
  augmentation beside the labels; then it becomes one-hot channels and, as nnU-Net does, is randomly
  dilated, eroded, opened or closed (p 0.4 per patch) and loses a random small connected component
  (p 0.2 per class): the network learns to correct the first stage, not to copy it.
- Validation of fold k: the same split means fold k of the low-resolution plan held those cases out,
  so their out-of-fold predictions are the ones it made.
- Prediction (`segplan predict`, bundles, ensembles: the stages of runner/inference/predict.py): the low-resolution plan's
  folds first, then the cascade's.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
from scipy import ndimage

from segplan.planner.labels import label_model
from segplan.planner.bundle_file import sha256
from segplan.planner.dataset import Case, read_label
from segplan.planner.fileio import save_npy, sweep_temporaries, write_json
from segplan.planner.plan import Plan
from segplan.runner.locks import exclusive
from segplan.runner.evaluation.oof import require_finished, require_same_split
from segplan.runner.preprocessing.preprocess import label_to_grid, load_case
from segplan.runner.workspace import Workspace

CASCADE = "3d_cascade_fullres"
OPERATOR_P = 0.4            # nnU-Net: ApplyRandomBinaryOperatorTransform(p_per_sample=0.4, strel_size=(1, 8))
BALL_RADIUS = (1.0, 8.0)
REMOVE_COMPONENT_P = 0.2    # nnU-Net: RemoveRandomConnectedComponentFromOneHotEncodingTransform(p_per_sample=0.2,
REMOVE_AT_MOST = 0.15       #          dont_do_if_covers_more_than_x_percent=0.15)


def previous_workspace(ws: Workspace) -> Workspace:
    """The 3d_lowres plan a cascade plan names in ``previous_stage``, refused by name when it is
    missing, of another configuration, or segments other labels."""
    path = ws.base / ws.plan.previous_stage
    if not path.is_file():
        raise FileNotFoundError(f"{ws.plan_path}: previous_stage: {path} does not exist (the 3d_lowres plan this "
                                "cascade builds on; the path is relative to the plan file)")
    low = Workspace(path)
    if low.plan.configuration != "3d_lowres":
        raise ValueError(f"{ws.plan_path}: previous_stage: {path} is a '{low.plan.configuration}' plan; a cascade "
                         "builds on a 3d_lowres plan")
    if label_model(low.plan).labels != label_model(ws.plan).labels:   # the one-hot channels are per label
        raise ValueError(f"{ws.plan_path}: previous_stage: {path} segments {low.plan.dataset.labels}, this plan "
                         f"{ws.plan.dataset.labels}: a cascade needs the same labels in the same order")
    return low


def check_previous_stage(ws: Workspace) -> Workspace:
    """The previous stage's workspace once each of its folds has finished with its out-of-fold
    predictions and its split is the cascade's; otherwise refused, naming the commands to run."""
    low = previous_workspace(ws)
    require_finished(low, f"{ws.plan_path} (3d_cascade_fullres, trained on its previous stage's predictions)")
    require_same_split([low, ws])
    return low


def previous_stage_maps(ws: Workspace, preprocessed: Path) -> Path:
    """WORK/previous_stage/<key>/: every case's out-of-fold previous-stage prediction as class
    indices on this plan's preprocessed grid (``<case>.npy``, int8), with ``<case>.json`` (written
    last) naming the prediction file and its SHA-256: a case is redone when that prediction changed
    (its low-resolution fold was trained again), and a killed run leaves nothing half written."""
    low = check_previous_stage(ws)
    out = ws.previous_stage_maps
    out.mkdir(parents=True, exist_ok=True)
    held_out = {cid: k for k, s in enumerate(low.splits()) for cid in s["val"]}
    with exclusive(out / ".lock", f"the previous-stage maps {out}"):
        sweep_temporaries(out)
        for case in ws.dataset.cases:
            source = low.fold(held_out[case.case_id]).validation_labels(case.case_id)
            meta, digest = out / f"{case.case_id}.json", sha256(source)
            if meta.exists() and json.loads(meta.read_text()).get("sha256") == digest:
                continue
            props = load_case(preprocessed, case.case_id)[2]
            labels = read_label(source)[0]
            if list(labels.shape) != list(props["geometry"]["shape"]):
                raise ValueError(f"{source}: shape {list(labels.shape)}, but case {case.case_id} is "
                                 f"{props['geometry']['shape']}: not a prediction of this case; run "
                                 f"`segplan run {low.plan_path} --fold {held_out[case.case_id]} --restart`")
            save_npy(out / f"{case.case_id}.npy", label_to_grid(labels, props, ws.plan))
            write_json(meta, {"source": str(source), "sha256": digest})
    return out


def load_previous(folder: Path, case_id: str, shape) -> np.ndarray:
    """A case's previous-stage class map (memory-mapped), which must lie on the case's preprocessed grid."""
    path = Path(folder) / f"{case_id}.npy"
    if not (Path(folder) / f"{case_id}.json").exists():
        raise FileNotFoundError(f"{folder}: case {case_id} has no previous-stage map; `segplan run` makes them")
    classes = np.load(path, mmap_mode="r", allow_pickle=False)
    if tuple(classes.shape) != tuple(shape):
        raise ValueError(f"{path}: shape {tuple(classes.shape)}, the preprocessed case is {tuple(shape)}; delete "
                         f"{folder} and run again to remake it")
    return classes


def one_hot_foreground(classes: np.ndarray, n_classes: int, axis: int = 0) -> np.ndarray:
    """Class indices -> float32 channels 1..n_classes-1 (background is what they leave), at ``axis``."""
    onehot = np.stack([classes == k for k in range(1, n_classes)], axis=axis)
    return onehot.astype(np.float32)


def previous_channels(labels: np.ndarray, props: dict, plan: Plan) -> np.ndarray:
    """The previous stage's label map on a case's original grid -> (foreground classes, *grid) float32
    channels on the grid ``props`` describes (the case as this plan preprocessed it)."""
    if list(labels.shape) != list(props["geometry"]["shape"]):
        raise ValueError(f"case {props['case_id']}: the previous stage's prediction has shape {list(labels.shape)}, "
                         f"the image {props['geometry']['shape']}")
    return one_hot_foreground(label_to_grid(labels, props, plan), label_model(plan).n_classes)


def out_of_fold_labels(low: Workspace, k: int) -> Callable[[Case], np.ndarray]:
    """case -> its out-of-fold prediction by fold ``k`` of the previous stage: what a cascade fold's
    validation cases take (fold k held them out; the split is the same)."""
    return lambda case: read_label(low.fold(k).validation_labels(case.case_id))[0]


def move_previous_to_data(batch: dict, n_classes: int, rng: np.random.Generator | None) -> dict:
    """``seg`` channel 1 (the previous stage's classes, augmented spatially with the labels in channel
    0) -> one-hot foreground channels appended to ``data``; with ``rng``, nnU-Net's corruptions of
    them (``corrupt``)."""
    seg = batch["seg"]
    onehot = one_hot_foreground(np.rint(seg[:, 1]).astype(np.int16), n_classes, axis=1)
    if rng is not None:
        onehot = corrupt(onehot, rng)
    return {**batch, "data": np.concatenate([batch["data"], onehot], axis=1), "seg": seg[:, :1]}


def _ball(radius: float, mask: np.ndarray, grow: bool) -> np.ndarray:
    """Dilation (``grow``) or erosion of a boolean mask by a ball of ``radius`` voxels, as distances
    (one Euclidean distance transform whatever the radius, where a structuring element costs radius^d)."""
    if grow:
        return ndimage.distance_transform_edt(~mask) <= radius if mask.any() else mask
    return ndimage.distance_transform_edt(mask) > radius if (~mask).any() else mask


def _operate(mask: np.ndarray, op: str, radius: float) -> np.ndarray:
    if op == "dilation":
        return _ball(radius, mask, True)
    if op == "erosion":
        return _ball(radius, mask, False)
    if op == "closing":
        return _ball(radius, _ball(radius, mask, True), False)
    return _ball(radius, _ball(radius, mask, False), True)  # opening


def corrupt(onehot: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """nnU-Net's augmentation of the previous stage's one-hot channels (b, classes, *spatial), drawn
    from ``rng``: per patch with p OPERATOR_P, each class in random order dilated, eroded, opened or
    closed by a ball of radius uniform in BALL_RADIUS (voxels a class gains are taken from the others,
    so the channels stay one-hot); then per patch with p REMOVE_COMPONENT_P, each class loses one
    random connected component smaller than REMOVE_AT_MOST of the patch."""
    out = onehot.copy()
    conn = np.ones((3,) * (onehot.ndim - 2), bool)
    for b in range(out.shape[0]):
        if rng.random() < OPERATOR_P:
            for c in rng.permutation(out.shape[1]):
                before = out[b, c] > 0
                after = _operate(before, ["dilation", "erosion", "opening", "closing"][int(rng.integers(4))],
                                 float(rng.uniform(*BALL_RADIUS)))
                out[b, :, after & ~before] = 0
                out[b, c] = after
        if rng.random() < REMOVE_COMPONENT_P:
            for c in range(out.shape[1]):
                comp, n = ndimage.label(out[b, c] > 0, conn)
                sizes = np.bincount(comp.ravel())[1:]
                small = [i + 1 for i in range(n) if sizes[i] < REMOVE_AT_MOST * comp.size]
                if small:
                    out[b, c][comp == small[int(rng.integers(len(small)))]] = 0
    return out


def stage_chain(workspaces: list[Workspace]) -> list[tuple[Workspace, Workspace | None]]:
    """The plans, each once, with the plan each builds on (a cascade's previous stage), previous
    stages first: what a bundle holds, what a prediction runs."""
    found: dict[Path, tuple[Workspace, Workspace | None]] = {}

    def add(ws: Workspace) -> Workspace:
        key = ws.plan_path.resolve()
        if key not in found:
            prev = add(previous_workspace(ws)) if ws.plan.configuration == "3d_cascade_fullres" else None
            found[key] = (ws, prev)
        return found[key][0]
    for ws in workspaces:
        add(ws)
    return list(found.values())
