"""Resampling on SimpleITK's grids (multi-threaded), the one place voxel grids change.

Corners of the two grids stay aligned; voxels past the last input voxel take the nearest one (never
a default value). Images: B-spline or linear, one axis at a time, each as a matrix of SimpleITK's
1D weights applied by BLAS: the 3D tensor-product result, about 10x faster. Labels:
one-hot linear + argmax (never invents a class), computed per class inside its bounding box. An
axis over the plan's anisotropy threshold coarser than the others is done last, with its own order.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from planner.dataset import zyx_to_xyz

_INTERP = {0: sitk.sitkNearestNeighbor, 1: sitk.sitkLinear, 3: sitk.sitkBSpline}


def _resample_axes(arr: np.ndarray, old_sp, new_sp, new_shape, interp, vector: bool = False,
                   start=(0, 0, 0), out_start=(0, 0, 0), pixel=None) -> np.ndarray:
    """SimpleITK's own 3D resampling of a (z, y, x) array (or (z, y, x, k) vector) on grids whose
    voxel corners stay aligned: the reference the fast paths below are tested against, and the
    per-class blocks of ``label_linear`` (``arr`` starting at input voxel ``start``, the output at
    output voxel ``out_start`` of the same two grids; ``pixel``: the output type, else the input's).

    The two grids cover the same extent only up to rounding of the shape, so the last output voxel
    can lie past the last input voxel (37 slices at 2.7 mm back to 101 at 1 mm): such voxels take the
    nearest input voxel (SimpleITK's nearest-neighbour extrapolator), never a default value, so
    every voxel of the output comes from real data."""
    img = sitk.GetImageFromArray(arr, isVector=vector)
    img.SetSpacing(tuple(float(s) for s in zyx_to_xyz(old_sp)))
    img.SetOrigin(tuple(float(a * o) for a, o in zip(zyx_to_xyz(start), zyx_to_xyz(old_sp))))
    origin = tuple(float(-0.5 * o + 0.5 * n + b * n)
                   for o, n, b in zip(zyx_to_xyz(old_sp), zyx_to_xyz(new_sp), zyx_to_xyz(out_start)))
    out = sitk.Resample(img, [int(s) for s in zyx_to_xyz(new_shape)], sitk.Transform(), interp, origin,
                        tuple(float(s) for s in zyx_to_xyz(new_sp)), img.GetDirection(), 0.0,
                        img.GetPixelID() if pixel is None else pixel, True)
    return sitk.GetArrayFromImage(out)


def _axis_operator(n_in: int, n_out: int, sp_in: float, sp_out: float, interp) -> np.ndarray:
    """SimpleITK's 1D interpolation from ``n_in`` to ``n_out`` voxels as an (n_in, n_out) matrix:
    the identity resampled as a 2D image along x only (row i: where input voxel i's weight goes,
    B-spline prefilter, mirror boundary and nearest extrapolation included). Weights below 1e-7
    are dropped (the B-spline prefilter's tails; denormal numbers would slow the product 10x)."""
    eye = sitk.GetImageFromArray(np.eye(n_in, dtype=np.float32))
    eye.SetSpacing((float(sp_in), 1.0))
    out = sitk.Resample(eye, [int(n_out), int(n_in)], sitk.Transform(), interp,
                        (float(-0.5 * sp_in + 0.5 * sp_out), 0.0), (float(sp_out), 1.0), eye.GetDirection(), 0.0,
                        sitk.sitkFloat32, True)
    op = sitk.GetArrayFromImage(out)
    op[np.abs(op) < 1e-7] = 0.0
    return op


def _apply_along(arr: np.ndarray, axis: int, op: np.ndarray, block: int = 128) -> np.ndarray:
    """``arr`` with ``op`` (n_in, n_out) applied along ``axis``, ``arr`` viewed as (before, n_in,
    after) without a copy. ``op`` is banded (a few dozen weights per output voxel), so the axis goes
    by blocks of ``block`` output voxels, each with only the input rows it reads: the cost grows
    with the axis, not with its square (a 630-voxel axis: 0.13 s instead of 0.32 s as one product)."""
    shape = arr.shape
    pre, post = int(np.prod(shape[:axis])), int(np.prod(shape[axis + 1:]))
    a3 = np.ascontiguousarray(arr, dtype=np.float32).reshape(pre, shape[axis], post)
    out = np.empty((pre, op.shape[1], post), np.float32)
    for b0 in range(0, op.shape[1], block):
        cols = op[:, b0:b0 + block]
        rows = np.flatnonzero(np.any(cols != 0, axis=1))
        lo, hi = (int(rows[0]), int(rows[-1]) + 1) if rows.size else (0, 1)
        w = np.ascontiguousarray(cols[lo:hi])
        if post == 1:
            out[:, b0:b0 + w.shape[1], 0] = a3[:, lo:hi, 0] @ w
        else:
            out[:, b0:b0 + w.shape[1], :] = np.matmul(w.T[None], a3[:, lo:hi, :])
    return out.reshape(shape[:axis] + (op.shape[1],) + shape[axis + 1:])


def _separable(arr: np.ndarray, old_sp, new_sp, new_shape, interps: list) -> np.ndarray:
    """Images (and probability vectors): each axis that changes, in turn, as a 1D operator of
    SimpleITK's interpolation (``interps[a]``: its interpolator, or None for nearest by indexing).
    The tensor-product kernel makes this the 3D result (tests/test_resampling.py), at a fraction
    of the cost: a 630x630 plane of 95 slices in B-spline takes 0.5 s instead of 5.6 s."""
    out = arr
    for a in range(3):
        if out.shape[a] == int(new_shape[a]) and np.isclose(old_sp[a], new_sp[a]):
            continue
        if interps[a] is None:
            out = _nearest_along(out, a, old_sp[a], new_sp[a], int(new_shape[a]))
        else:
            out = _apply_along(out, a, _axis_operator(out.shape[a], int(new_shape[a]), old_sp[a], new_sp[a],
                                                      interps[a]))
    return out


def _nearest_along(arr: np.ndarray, axis: int, old_sp: float, new_sp: float, n_out: int) -> np.ndarray:
    """Nearest-neighbour resampling along one axis (the others unchanged) by indexing: what
    SimpleITK's nearest interpolator and extrapolator give on the same corner-aligned grids (the
    continuous index rounded half up, clamped to the volume), without an interpolator call per
    voxel. At an exact tie (an output centre halfway between two input centres, e.g. 2.7 mm -> 1 mm
    at slice 40) both are equally near: this takes the upper one, where SimpleITK's floating-point
    path sometimes lands on the lower."""
    x = (np.arange(n_out) + 0.5) * (new_sp / old_sp) - 0.5
    idx = np.clip(np.floor(x + 0.5), 0, arr.shape[axis] - 1).astype(np.intp)
    return np.take(arr, idx, axis=axis)


LABEL_MARGIN = 2   # input voxels around each class's bounding box: linear interpolation reaches 1


def label_linear(classes: np.ndarray, old_sp, new_sp, new_shape) -> np.ndarray:
    """Class indices resampled as one-hot linear interpolation + argmax (SimpleITK's sitkLabelLinear,
    ties to the lower class), computed per foreground class inside its bounding box only.

    Outside a class's box (plus LABEL_MARGIN) its interpolated indicator is exactly 0, and the
    indicators sum to 1, so background = 1 - sum of the others: one small float block per class
    instead of a full-size evaluation of every class at every voxel (15 of 17 s of a CT's
    preprocessing went there). Same output as sitkLabelLinear (tests/test_resampling.py)."""
    new_shape = [int(s) for s in new_shape]
    out = np.zeros(new_shape, classes.dtype)
    scale = [o / n for o, n in zip(old_sp, new_sp)]
    blocks = []   # per present class: its input box (with margin) and the output voxels it can reach
    for k, box in enumerate(ndimage.find_objects(classes), start=1):   # one pass for every class's box
        if box is None:
            continue
        lo = [max(0, sl.start - LABEL_MARGIN) for sl in box]
        hi = [min(n, sl.stop + LABEL_MARGIN) for sl, n in zip(box, classes.shape)]
        # output voxels whose centres lie within the box's extent (corners aligned)
        o_lo = [max(0, int(np.floor(l * s - 0.5))) for l, s in zip(lo, scale)]
        o_hi = [min(n, int(np.ceil(h * s + 0.5))) for h, s, n in zip(hi, scale, new_shape)]
        if all(a < b for a, b in zip(o_lo, o_hi)):
            blocks.append((k, lo, hi, o_lo, o_hi))
    if not blocks:
        return out
    # the best foreground indicator and the background only over the union of the reachable voxels
    u_lo = [min(b[3][a] for b in blocks) for a in range(3)]
    u_hi = [max(b[4][a] for b in blocks) for a in range(3)]
    union = tuple(slice(a, b) for a, b in zip(u_lo, u_hi))
    best = np.zeros([b - a for a, b in zip(u_lo, u_hi)], np.float64)
    background = np.ones_like(best)
    for k, lo, hi, o_lo, o_hi in blocks:
        block = (classes[tuple(slice(a, b) for a, b in zip(lo, hi))] == k).astype(np.float32)
        v = _resample_axes(block, old_sp, new_sp, [b - a for a, b in zip(o_lo, o_hi)], sitk.sitkLinear,
                           start=lo, out_start=o_lo, pixel=sitk.sitkFloat64)
        sl = tuple(slice(a - u, b - u) for a, b, u in zip(o_lo, o_hi, u_lo))
        background[sl] -= v
        win = v > best[sl]
        best[sl][win] = v[win]
        out[union][sl][win] = k
    out[union][background >= best] = 0
    return out


def resample(arr: np.ndarray, old_sp, new_sp, new_shape, order: int, anisotropy_threshold: float,
             anisotropic_order: int, label: bool = False, vector: bool = False) -> np.ndarray:
    """Resample one volume; along an axis over ``anisotropy_threshold`` x coarser than the others
    (in either grid) do the other axes first, then that axis with ``anisotropic_order``."""
    old_sp, new_sp, new_shape = list(old_sp), list(new_sp), list(new_shape)
    if list(arr.shape[:3]) == new_shape and np.allclose(old_sp, new_sp):
        return arr
    interp = _INTERP.get(order, sitk.sitkBSpline)
    coarse = None
    for sp in (old_sp, new_sp):
        a = int(np.argmax(sp))
        if sp[a] > anisotropy_threshold * max(s for i, s in enumerate(sp) if i != a):
            coarse = a
    if label:
        if coarse is None:
            return label_linear(arr, old_sp, new_sp, new_shape)
        mid_sp, mid_shape = list(new_sp), list(new_shape)
        mid_sp[coarse], mid_shape[coarse] = old_sp[coarse], arr.shape[coarse]
        mid = label_linear(arr, old_sp, mid_sp, mid_shape)
        return _nearest_along(mid, coarse, old_sp[coarse], new_sp[coarse], int(new_shape[coarse]))
    # images: axis by axis; a coarse axis with the anisotropic order (0: nearest, by indexing)
    interps = [interp] * 3
    if coarse is not None:
        interps[coarse] = None if anisotropic_order == 0 else _INTERP.get(anisotropic_order, sitk.sitkLinear)
    return _separable(arr, old_sp, new_sp, new_shape, interps)


def target_shape(shape, spacing, target) -> list[int]:
    return [max(1, int(round(s * sp / t))) for s, sp, t in zip(shape, spacing, target)]
