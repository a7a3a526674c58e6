"""Every voxel of the original grid gets a prediction from real data: the forward resampling and its
inverse never fill a border slice with a default value (issue 10: 101 slices at 1 mm -> 2.7 mm
used to lose slice 100; 7 slices 1 mm -> 2 mm lost the last image and label slice)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planner.dataset import Geometry
from planner.plan_file import load_plan
from runner.preprocess import invert_probabilities, preprocess_image
from runner.resampling import resample

PLAN = Path(__file__).resolve().parents[1] / "plans" / "hippocampus.yaml"


def _plan(target):
    plan = load_plan(PLAN, check_paths=False)
    return plan.replace(resampling=dataclasses.replace(plan.resampling, target_spacing=list(target)))


def _round_trip(shape, spacing, target, cls: int, n_classes: int = 3):
    """Constant image and label of class ``cls`` -> preprocessed -> one-hot at target -> inverted."""
    plan = _plan(target)
    value = list(plan.dataset.labels.values())[cls]
    geom = Geometry(tuple(spacing), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), tuple(shape))
    image = np.full((1, *shape), 7.0, np.float32)
    label = np.full(shape, value, np.uint8)
    data, seg, props = preprocess_image(image, geom, plan, "x", label)
    probs = np.zeros((n_classes, *seg.shape), np.float32)
    probs[cls] = 1.0
    return seg, invert_probabilities(probs, props, plan, full=False), invert_probabilities(probs, props, plan)


@pytest.mark.parametrize("n,sp,target", [(101, 1.0, 2.7), (230, 1.25, 2.7), (7, 1.0, 2.0), (37, 2.7, 1.0)])
def test_the_reported_edge_cases_keep_every_slice(n, sp, target):
    seg, classes, full = _round_trip((n, 6, 6), (sp, 1.0, 1.0), (target, 1.0, 1.0), 1)
    assert np.all(seg == 1), "forward: a resampled label slice came from outside the data"
    assert classes.shape == (n, 6, 6) and np.all(classes == 1), np.flatnonzero((classes != 1).any(axis=(1, 2)))
    assert np.allclose(full[1], 1.0)


@settings(max_examples=60, deadline=None)
@given(shape=st.tuples(*[st.integers(1, 40)] * 3), spacing=st.tuples(*[st.floats(0.3, 5.0)] * 3),
       target=st.tuples(*[st.floats(0.3, 5.0)] * 3), cls=st.integers(0, 2))
def test_constant_class_round_trips_on_every_voxel(shape, spacing, target, cls):
    seg, classes, full = _round_trip(shape, spacing, target, cls)
    assert np.all(seg == cls)
    assert classes.shape == tuple(shape) and np.all(classes == cls)
    assert np.array_equal(np.argmax(full, axis=0), classes)


def test_images_take_the_nearest_border_value_not_zero():
    arr = np.full((7, 4, 4), 5.0, np.float32)
    out = resample(arr, [1.0, 1.0, 1.0], [2.0, 1.0, 1.0], [4, 4, 4], 3, 3.0, 0)
    assert out.shape == (4, 4, 4) and np.allclose(out, 5.0, atol=1e-4)


def _blobs(rng, shape, classes):
    from scipy import ndimage
    noise = ndimage.gaussian_filter(rng.normal(size=[classes] + list(shape)), (0, 1.5, 1.5, 1.5))
    lab = np.argmax(noise, 0).astype(np.uint8)
    lab[ndimage.gaussian_filter(rng.normal(size=shape), 1.5) < 0] = 0
    return lab


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), shape=st.tuples(*[st.integers(2, 30)] * 3),
       old=st.tuples(*[st.floats(0.4, 5.0)] * 3), new=st.tuples(*[st.floats(0.4, 5.0)] * 3),
       classes=st.integers(2, 6))
def test_label_resampling_by_class_boxes_equals_simpleitk_label_linear(seed, shape, old, new, classes):
    """The fast path (one float block per class, inside its bounding box) gives exactly what
    SimpleITK's sitkLabelLinear gives over the whole volume, ties included (lower class wins)."""
    import SimpleITK as sitk
    from runner.resampling import _resample_axes, label_linear, target_shape
    lab = _blobs(np.random.default_rng(seed), shape, classes)
    out_shape = target_shape(shape, old, new)
    ours = label_linear(lab, old, new, out_shape)
    assert np.array_equal(ours, _resample_axes(lab, old, new, out_shape, sitk.sitkLabelLinear))


@pytest.mark.parametrize("old,new,order", [((1.0, 0.7, 0.7), (2.0, 0.77, 0.77), 3), ((4.3, 0.79, 0.79), (3.2, 0.77, 0.77), 3),
                                           ((1.0, 1.0, 1.0), (1.5, 0.6, 0.8), 1), ((0.7, 2.5, 0.7), (0.8, 2.0, 0.8), 3)])
def test_images_resampled_axis_by_axis_equal_simpleitk_in_3d(old, new, order):
    """Separable: one axis at a time, each as a matrix of SimpleITK's 1D weights, gives SimpleITK's
    3D B-spline / linear result (anisotropic cases: as the two-step path before)."""
    from scipy import ndimage
    from runner.resampling import _INTERP, _resample_axes, resample, target_shape
    img = ndimage.gaussian_filter(np.random.default_rng(0).normal(size=(20, 40, 36)), 2).astype(np.float32)
    shape = target_shape(img.shape, old, new)
    ours = resample(img, old, new, shape, order, 3.0, order)
    coarse = [int(np.argmax(sp)) for sp in (old, new) if max(sp) > 3 * sorted(sp)[1]]
    if not coarse:
        ref = _resample_axes(img, old, new, shape, _INTERP[order])
    else:  # the previous implementation: the other axes in one 3D step, then the coarse axis in another
        a = coarse[-1]
        mid_sp, mid_shape = list(new), list(shape)
        mid_sp[a], mid_shape[a] = old[a], img.shape[a]
        mid = _resample_axes(img, old, mid_sp, mid_shape, _INTERP[order])
        ref = _resample_axes(mid, mid_sp, new, shape, _INTERP[order])
    # an output voxel whose centre falls exactly on the volume's edge is "inside" (B-spline) or
    # "outside" (nearest extrapolation) depending on SimpleITK's floating-point path: both are right
    keep = np.ones(ref.shape, bool)
    for a in range(3):
        x = (np.arange(shape[a]) + 0.5) * (new[a] / old[a]) - 0.5
        edge = np.isclose(x, img.shape[a] - 0.5, atol=1e-6) | np.isclose(x, -0.5, atol=1e-6)
        keep[(slice(None),) * a + (edge,)] = False
    assert ours.shape == tuple(shape) and keep.mean() > 0.9
    assert np.allclose(ours[keep], ref[keep], atol=1e-5 * np.abs(ref).max())
    # the vector path (probabilities back to the original grid) is the same per component
    vec = np.stack([img, -img], -1)
    both = resample(vec, old, new, shape, order, 3.0, order, vector=True)
    assert np.allclose(both[..., 0], ours, atol=1e-5 * np.abs(ours).max())
    assert np.allclose(both[..., 1], -ours, atol=1e-5 * np.abs(ours).max())


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 300), old=st.floats(0.3, 6.0), new=st.floats(0.3, 6.0))
def test_nearest_along_an_axis_by_indexing_equals_simpleitk_but_at_exact_ties(n, old, new):
    import SimpleITK as sitk
    from runner.resampling import _nearest_along, _resample_axes
    n_out = max(1, int(round(n * old / new)))
    arr = np.arange(n, dtype=np.int16).reshape(n, 1, 1)
    ours = _nearest_along(arr, 0, old, new, n_out).ravel()
    ref = _resample_axes(arr, [old, 1.0, 1.0], [new, 1.0, 1.0], [n_out, 1, 1], sitk.sitkNearestNeighbor).ravel()
    x = (np.arange(n_out) + 0.5) * (new / old) - 0.5
    tie = np.isclose(x - np.floor(x), 0.5, atol=1e-9)
    assert np.array_equal(ours[~tie], ref[~tie])
    assert np.all(np.abs(ours - ref) <= 1)   # at a tie: one of the two equally near slices


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), shape=st.tuples(*[st.integers(4, 24)] * 3),
       old=st.tuples(*[st.floats(0.5, 2.0)] * 3), new=st.tuples(*[st.floats(0.5, 2.0)] * 3), order=st.sampled_from([1, 3]))
def test_axis_by_axis_equals_simpleitk_3d_on_random_grids(seed, shape, old, new, order):
    """(At least 4 voxels per axis: SimpleITK's 3D cubic B-spline treats a 1-voxel axis beside a
    2-voxel one differently from its own 1D weights, 5e-4 apart; no image is that small.)"""
    from runner.resampling import _INTERP, _resample_axes, _separable, target_shape
    img = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    out_shape = target_shape(shape, old, new)
    ours = _separable(img, list(old), list(new), out_shape, [_INTERP[order]] * 3)
    ref = _resample_axes(img, old, new, out_shape, _INTERP[order])
    keep = np.ones(ref.shape, bool)
    for a in range(3):
        x = (np.arange(out_shape[a]) + 0.5) * (new[a] / old[a]) - 0.5
        keep[(slice(None),) * a + (np.isclose(x, shape[a] - 0.5, atol=1e-6) | np.isclose(x, -0.5, atol=1e-6),)] = False
    assert np.allclose(ours[keep], ref[keep], atol=1e-4 * max(1.0, np.abs(ref).max()))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_long_axes_go_by_blocks_with_the_same_result(axis):
    """The banded operator applied block by block (only the input rows each block reads) equals the
    whole matrix product, on every axis, for images and probability vectors."""
    import SimpleITK as sitk
    from runner.resampling import _apply_along, _axis_operator
    rng = np.random.default_rng(axis)
    arr = rng.normal(size=(30, 34, 38, 2)).astype(np.float32)
    op = _axis_operator(arr.shape[axis], arr.shape[axis] * 2 - 3, 1.0, 0.5, sitk.sitkBSpline)
    whole = np.moveaxis(np.moveaxis(arr, axis, -1) @ op, -1, axis)
    for block in (7, 16, 1000):
        assert np.allclose(_apply_along(arr, axis, op, block=block), whole, atol=1e-5)
        assert np.allclose(_apply_along(arr[..., 0], axis, op, block=block), whole[..., 0], atol=1e-5)
