"""Preprocessing per the plan, its exact inverse for predictions, and the on-disk cache.

Forward: common intensity unit (HU for CT) -> crop to the non-zero region -> clip / z-score ->
resample to the target spacing. Inverse (for predictions): resample class probabilities back to
the cropped grid -> un-crop -> argmax -> original label values, written with the original geometry
(runner/preprocessing/inversion.py). Resampling: runner/preprocessing/resampling.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from segplan.planner.dataset import Geometry, read_image, read_label
from segplan.planner.fileio import save_npy, save_npz, sweep_temporaries, write_json
from segplan.planner.intensity import explain_convention, nonzero_box, to_hu
from segplan.planner.parallel import parallel_map
from segplan.planner.labels import LabelModel, label_model
from segplan.planner.orientation import Reorientation, orient, reorientation
from segplan.planner.plan import Plan
from segplan.runner.locks import exclusive
from segplan.runner.preprocessing.resampling import resample, target_shape
from segplan.runner.trust.features import image_features
from segplan.runner.workspace import Workspace, preprocessing_fields

CLASS_LOCATIONS_PER_CLASS = 10_000
CLASS_LOCATION_SEED = 0      # which stored voxels represent a large class: fixed, so a rerun stores the same
ANNOTATED = "annotated"      # with an ignore label: stored locations of annotated voxels (any class), patch centres

def normalize(image: np.ndarray, plan: Plan) -> np.ndarray:
    """Clip / z-score each channel as the plan says (in place on a float32 array)."""
    for c, norm in enumerate(plan.intensity.normalization):
        ch = image[c]
        if norm.scheme == "none":
            continue
        if norm.scheme == "ct":
            np.clip(ch, norm.clip[0], norm.clip[1], out=ch)
        if norm.zscore == "dataset" and norm.scheme == "ct":
            mean, std = norm.mean, norm.std
        else:
            mean, std = float(ch.mean()), float(ch.std())
        ch -= np.float32(mean)
        ch /= np.float32(max(std, 1e-8))
    return image


def to_common_unit(image: np.ndarray, plan: Plan,
                   training_case: str | None = None) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """CT channels to HU; also, per channel, the convention read and why ('other', for a non-CT channel).

    ``training_case`` names one of the plan's training cases: its entry in intensity.conventions
    (as detected when planned, or as a person edited it) decides. Any other image (None: a new
    image at prediction, whatever its file is called) is judged by its own values: a file named
    like a training case must never borrow that case's unit."""
    table = plan.intensity.conventions if training_case is not None else {}
    units = []
    for c, norm in enumerate(plan.intensity.normalization):
        if norm.scheme != "ct":
            units.append(("other", "not a CT channel"))
            continue
        if training_case in table:
            units.append((table[training_case], f"intensity.conventions.{training_case} in the plan"))
        else:
            units.append(explain_convention(image[c], True))
        image[c] = to_hu(image[c], units[-1][0], plan.intensity.windowed_range)
    return image, units


def preprocess_image(image: np.ndarray, geom: Geometry, plan: Plan, case_id: str,
                     label: np.ndarray | None = None,
                     training_case: bool = False) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """(c, z, y, x) image (+ label values) -> normalised, resampled data (+ class indices) and the
    properties needed to invert it, with the unit each channel was read in (``conventions``, and
    the evidence for it). ``training_case``: ``case_id`` is one of the plan's training cases, whose
    unit the plan's table gives; otherwise (the default, every new image) the values decide.

    With ``dataset.orientation`` the image (and label) is first brought to it by axis permutation and
    flips (planner/orientation.py); the crop box and shapes in the properties are of the oriented
    grid, ``geometry`` stays the input's own (where predictions go back to) and ``orientation``
    says how to get from one to the other."""
    r = reorientation_for(geom, plan)
    if r is not None:
        image = np.ascontiguousarray(orient(image, r))
        label = np.ascontiguousarray(orient(label, r)) if label is not None else None
    grid = r.geometry if r is not None else geom
    image, units = to_common_unit(image.astype(np.float32, copy=False), plan, case_id if training_case else None)
    ct = [n.scheme == "ct" for n in plan.intensity.normalization]
    box = nonzero_box(image, ct)
    sl = tuple(slice(a, b) for a, b in box)
    image = np.ascontiguousarray(image[(slice(None),) + sl])
    image = normalize(image, plan)
    features = image_features(image)   # the quality check's: is this input like the training cases?
    rs = plan.resampling
    new_shape = target_shape(image.shape[1:], grid.spacing, rs.target_spacing)
    data = np.stack([resample(ch, grid.spacing, rs.target_spacing, new_shape, rs.image_order,
                              rs.anisotropy_threshold, rs.anisotropic_order) for ch in image]).astype(np.float32)
    props = {"case_id": case_id, "geometry": geom.to_dict(), "crop_box": [list(b) for b in box],
             "cropped_shape": list(image.shape[1:]), "resampled_shape": new_shape,
             "conventions": [u[0] for u in units], "convention_evidence": [u[1] for u in units],
             "image_features": features}
    if r is not None:
        props["orientation"] = r.to_dict()
    seg = _label_on_grid(label, props, plan, grid) if label is not None else None
    return data, seg, props


def label_to_grid(label: np.ndarray, props: dict, plan: Plan) -> np.ndarray:
    """A label map (label values) on a case's original grid -> class indices on its preprocessed grid
    (the crop box and target spacing ``props`` record), resampled as the plan resamples labels: the
    reference in preprocessing, a cascade's previous-stage prediction (runner/cascade.py)."""
    r = _recorded(props)
    if r is not None:
        label = np.ascontiguousarray(orient(label, r))
    return _label_on_grid(label, props, plan, r.geometry if r is not None else Geometry.from_dict(props["geometry"]))


def _label_on_grid(label: np.ndarray, props: dict, plan: Plan, grid: Geometry) -> np.ndarray:
    """``label_to_grid`` for a label map already on the (oriented) grid ``grid``."""
    rs = plan.resampling
    sl = tuple(slice(a, b) for a, b in props["crop_box"])
    classes = labels_to_classes(label[sl], plan)
    return resample(classes, grid.spacing, rs.target_spacing, props["resampled_shape"], 0, rs.anisotropy_threshold, 0,
                    label=rs.label_mode == "onehot_linear").astype(np.int8 if len(plan.dataset.labels) < 128 else np.int16)


def reorientation_for(geom: Geometry, plan: Plan) -> Reorientation | None:
    """How an image on ``geom`` is brought to the plan's orientation; None where the plan has none or
    the image already lies so."""
    if plan.dataset.orientation is None:
        return None
    r = reorientation(geom, plan.dataset.orientation)
    return None if r.identity else r


def _recorded(props: dict) -> Reorientation | None:
    return Reorientation.from_dict(props["orientation"]) if "orientation" in props else None


def labels_to_classes(label: np.ndarray, plan: Plan) -> np.ndarray:
    """Label values (possibly non-consecutive, e.g. 0..117) -> class indices 0..K-1 (uint8/16); the
    ignore label's voxels (dataset.ignore_label) -> K, one past the classes (planner/labels.py)."""
    lm = label_model(plan)
    values, ignore = list(lm.labels.values()), lm.ignore_label
    lut_size = max(max(values), ignore or 0, int(label.max()) if label.size else 0) + 1
    lut = np.zeros(lut_size, np.uint8 if len(values) < 256 else np.uint16)
    for i, v in enumerate(values):
        lut[v] = i
    if ignore is not None:
        lut[ignore] = lm.ignore_index
    if label.dtype.kind not in "iu" or (label.size and label.min() < 0):
        label = label.astype(np.int64)   # float or signed label files: whole values checked on reading
    return lut[label]                    # indexed in the label's own integer type: no 8-byte copy


def class_locations(seg: np.ndarray, lm: LabelModel, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Up to 10 000 voxel coordinates per foreground class, for foreground oversampling; with an
    ignore label (class index K unannotated) also of the annotated voxels, where the other patches
    are centred (nnU-Net's annotated_classes_key), so that no patch is all unannotated."""
    out, n_classes, ignore = {}, lm.n_classes, lm.has_ignore
    for k in range(1, n_classes):
        out[f"class_{k}"] = _locations(seg, seg.ravel() == k, rng)
    if ignore:
        out[ANNOTATED] = _locations(seg, seg.ravel() != n_classes, rng)
    return out


def _locations(seg: np.ndarray, flat_mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    idx = np.flatnonzero(flat_mask)
    if idx.size > CLASS_LOCATIONS_PER_CLASS:
        idx = rng.choice(idx, CLASS_LOCATIONS_PER_CLASS, replace=False)
    return np.stack(np.unravel_index(np.sort(idx), seg.shape), axis=1).astype(np.int32)


def _preprocess_one(args) -> str:
    case, plan, out = args
    if (out / f"{case.case_id}.json").exists():
        return case.case_id
    image, geom = read_image(case)
    label = read_label(case.label_file)[0] if case.label_file is not None else None
    data, seg, props = preprocess_image(image, geom, plan, case.case_id, label, training_case=True)
    del image, label
    save_npy(out / f"{case.case_id}.npy", data)
    if seg is not None:
        save_npy(out / f"{case.case_id}_seg.npy", seg)
        locs = class_locations(seg, label_model(plan), np.random.default_rng(CLASS_LOCATION_SEED))
        save_npz(out / f"{case.case_id}_locs.npz", **locs)
    # the properties file is written last: its presence marks a complete case
    write_json(out / f"{case.case_id}.json", props)
    return case.case_id


def preprocess_dataset(ws: Workspace, workers: int = 2, progress: bool = True) -> Path:
    """Preprocess every training case not yet in the cache; returns the cache folder."""
    plan = ws.plan
    out = ws.preprocessed
    out.mkdir(parents=True, exist_ok=True)
    # one process at a time per cache (jobs on several nodes): the next one finds the cases done
    with exclusive(out / ".lock", f"the preprocessing cache {out}"):
        write_json(out / "plan_fields.json", preprocessing_fields(plan), indent=1)
        sweep_temporaries(out)  # left by a killed run; the case they belong to is redone below
        todo = [c for c in ws.dataset.cases if not (out / f"{c.case_id}.json").exists()]
        parallel_map(_preprocess_one, [(c, plan, out) for c in todo], workers, desc="preprocess", progress=progress)
    return out


def load_case(folder: Path, case_id: str) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """A preprocessed case: data and seg (memory-mapped), properties; refuses incomplete cases."""
    props_path = folder / f"{case_id}.json"
    if not props_path.exists():
        raise FileNotFoundError(f"{folder}: case {case_id} is not (completely) preprocessed; run `segplan preprocess`")
    data = np.load(folder / f"{case_id}.npy", mmap_mode="r", allow_pickle=False)
    seg_path = folder / f"{case_id}_seg.npy"
    seg = np.load(seg_path, mmap_mode="r", allow_pickle=False) if seg_path.exists() else None
    return data, seg, json.loads(props_path.read_text())


def load_locations(folder: Path, case_id: str) -> dict[str, np.ndarray]:
    with np.load(folder / f"{case_id}_locs.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
