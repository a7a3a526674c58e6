"""Predictions back on the case's original grid: probabilities from the plan's target spacing to
the cropped original spacing, class by class (separable linear resampling, so the values are those
of resampling all at once), the crop box filled in, and an image brought to the plan's orientation
put back in its own. The inverse of preprocessing (runner/preprocessing/preprocess.py)."""
from __future__ import annotations

import numpy as np

from segplan.planner.dataset import Geometry
from segplan.planner.labels import THRESHOLD, LabelModel
from segplan.planner.orientation import unorient
from segplan.planner.plan import Plan
from segplan.runner.preprocessing.preprocess import _recorded
from segplan.runner.preprocessing.resampling import resample


def _back(probs: np.ndarray, props: dict, plan: Plan):
    """(the recorded reorientation or None, the original geometry, the crop box as slices, c -> class
    c's probabilities on the cropped original grid in float32)."""
    r = _recorded(props)
    geom = r.geometry if r is not None else Geometry.from_dict(props["geometry"])
    rs = plan.resampling

    def back(c: int) -> np.ndarray:
        return resample(probs[c].astype(np.float32, copy=False), rs.target_spacing, geom.spacing,
                        props["cropped_shape"], 1, rs.anisotropy_threshold, 1)
    return r, geom, tuple(slice(a, b) for a, b in props["crop_box"]), back


def _argmax_update(index: np.ndarray, best: np.ndarray | None, b: np.ndarray, c: int) -> np.ndarray:
    """One class of a running arg-max: ``index`` marks where class ``c`` beats every earlier one
    (strictly: ties keep the first class, as np.argmax); returns the running maximum."""
    if best is None:
        return np.array(b, np.float32)   # a copy: on an unchanged grid resample returns its input
    better = b > best
    index[better] = c
    np.maximum(best, b, out=best)
    return best


def _full_grid(cropped: np.ndarray, geom: Geometry, sl: tuple, r) -> np.ndarray:
    out = np.zeros(tuple(geom.shape), cropped.dtype)
    out[sl] = cropped
    return out if r is None else np.ascontiguousarray(unorient(out, r))


def invert_probabilities(probs: np.ndarray, props: dict, plan: Plan, full: bool = True,
                         background: bool = True) -> np.ndarray:
    """(K, z, y, x) probabilities at target spacing -> back on the original grid.

    ``full=True``: (K, original shape) float32, background 1 outside the crop box (``background``
    False: every channel 0 there, as a region plan's sigmoid outputs, which have no background
    channel). ``full=False``: only the (original-shape) class-index map, which spares the K x volume
    array of the full grid. An image brought to the plan's orientation is put back in its own.

    One class at a time (the resampling is separable and per channel, so the values are those of
    resampling all at once): the label map keeps a running maximum instead of K full-size channels
    (a 512 x 512 x 300 CT with 4 classes: 0.9 GB above the inputs instead of 1.9,
    benchmarks/resample_back_memory.py), and the probabilities are written into their output
    channel by channel."""
    r, geom, sl, back = _back(probs, props, plan)
    if not full:
        index = np.zeros(tuple(props["cropped_shape"]), np.uint8 if probs.shape[0] < 256 else np.uint16)
        best = None
        for c in range(probs.shape[0]):
            best = _argmax_update(index, best, back(c), c)
        del best
        return _full_grid(index, geom, sl, r)
    out = np.zeros((probs.shape[0],) + tuple(geom.shape), np.float32)
    out[0] = 1.0 if background else 0.0
    for c in range(probs.shape[0]):
        out[(c, *sl)] = back(c)
    return out if r is None else np.ascontiguousarray(unorient(out, r))


def invert_compact(probs: np.ndarray, props: dict, plan: Plan, lm: LabelModel) -> tuple[np.ndarray, np.ndarray]:
    """The label map and the probabilities on the original grid, the probabilities kept in float16
    (half the memory of ``invert_probabilities(full=True)``: a 512 x 512 x 300 CT with 4 classes
    0.63 GB instead of 1.26) and the label map made from the float32 values class by class, so it
    is the one ``lm.to_label_map`` makes of the float32 probabilities (arg-max, ties to the first;
    a region plan's sigmoids thresholded in order, every channel 0 outside the crop box)."""
    r, geom, sl, back = _back(probs, props, plan)
    k, cropped = probs.shape[0], tuple(props["cropped_shape"])
    out = np.zeros((k,) + tuple(geom.shape), np.float16)
    if lm.has_regions:
        above = np.zeros((k,) + cropped, bool)
    else:
        out[0] = 1.0
        index, best = np.zeros(cropped, np.uint8 if k < 256 else np.uint16), None
    for c in range(k):
        b = back(c)
        out[(c, *sl)] = b
        if lm.has_regions:
            above[c] = b > THRESHOLD
        else:
            best = _argmax_update(index, best, b, c)
        del b
    labels = (_full_grid(lm.to_label_map(above), geom, sl, r) if lm.has_regions     # 0 outside: no region there
              else lm.classes_to_labels(_full_grid(index, geom, sl, r)))        # background's value outside
    return labels, (out if r is None else np.ascontiguousarray(unorient(out, r)))
