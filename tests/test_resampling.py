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

from segplan.planner.dataset import Geometry
from segplan.planner.plan_file import load_plan
from segplan.runner.preprocessing.inversion import invert_probabilities
from segplan.runner.preprocessing.preprocess import preprocess_image
from segplan.runner.preprocessing.resampling import resample

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


def _random_probabilities(seed, shape, spacing, target, k):
    """Random (k, ...) probabilities on the target grid of a ``shape`` image cropped by 2 voxels at
    the start of each axis (an exact tie between classes 0 and 1 in the first voxel), and the props
    that put them back: (plan, rng, crop, cropped shape, probs, props)."""
    from segplan.runner.preprocessing.resampling import target_shape
    plan = _plan(target)
    rng = np.random.default_rng(seed)
    crop = [(min(2, s - 1), s) for s in shape]
    cropped = [b - a for a, b in crop]
    small = target_shape(cropped, spacing, target)
    probs = rng.random((k, *small)).astype(np.float32)
    probs[1].flat[0] = probs[0].flat[0]
    props = {"geometry": Geometry(tuple(spacing), (0.0,) * 3, (1, 0, 0, 0, 1, 0, 0, 0, 1), tuple(shape)).to_dict(),
             "crop_box": [list(c) for c in crop], "cropped_shape": cropped, "resampled_shape": small}
    return plan, rng, crop, cropped, probs, props


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1), shape=st.tuples(*[st.integers(2, 24)] * 3),
       spacing=st.tuples(*[st.floats(0.4, 4.0)] * 3), target=st.tuples(*[st.floats(0.4, 4.0)] * 3),
       k=st.integers(2, 5))
def test_one_class_at_a_time_equals_all_classes_at_once(seed, shape, spacing, target, k):
    """Issue 40, point 3: resampling back class by class (less memory) gives the probabilities of
    resampling every class in one call, and the label map is their arg-max (first class on ties)
    with a crop box and background outside it."""
    plan, rng, crop, cropped, probs, props = _random_probabilities(seed, shape, spacing, target, k)
    at_once = resample(np.moveaxis(probs, 0, -1), plan.resampling.target_spacing, spacing, cropped, 1,
                       plan.resampling.anisotropy_threshold, 1, vector=True).reshape(*cropped, k)
    full = invert_probabilities(probs, props, plan)
    sl = tuple(slice(a, b) for a, b in crop)
    np.testing.assert_allclose(np.moveaxis(full[(slice(None), *sl)], 0, -1), at_once, rtol=0, atol=1e-6)
    outside = np.ones(shape, bool)
    outside[sl] = False
    assert np.all(full[0][outside] == 1.0) and not full[1:, outside].any()
    classes = invert_probabilities(probs, props, plan, full=False)
    assert np.array_equal(classes[sl], np.argmax(at_once, axis=-1)) and not classes[outside].any()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1), shape=st.tuples(*[st.integers(2, 24)] * 3),
       spacing=st.tuples(*[st.floats(0.4, 4.0)] * 3), target=st.tuples(*[st.floats(0.4, 4.0)] * 3),
       k=st.integers(2, 5), regions=st.booleans())
def test_compact_probabilities_are_the_float32_ones_in_float16_and_leave_the_label_map_unchanged(
        seed, shape, spacing, target, k, regions):
    """Issue 40, point 3: the probabilities a single plan writes are kept in float16 on the original
    grid (half the memory), and the label map made beside them is still the float32 one: the same
    as ``to_label_map`` of invert_probabilities' float32 channels, ties (to the first class) and
    near-ties that float16 would merge included; non-consecutive label values, and regions
    thresholded in order with nothing outside the crop box."""
    from segplan.planner.labels import LabelModel
    from segplan.runner.preprocessing.inversion import invert_compact
    plan, rng, _, _, probs, props = _random_probabilities(seed, shape, spacing, target, k)
    probs[1].flat[-1] = np.nextafter(probs[0].flat[-1], 2)     # a near-tie float16 cannot tell apart
    values = [0] + sorted(rng.choice(np.arange(1, 120), k - 1, replace=False).tolist())
    lm = (LabelModel({f"l{v}": v for v in values}, {f"r{i}": [values[i]] for i in range(1, k)} | {"r0": values[1:]},
                     [values[(i % (k - 1)) + 1] for i in range(k)]) if regions
          else LabelModel({f"l{v}": v for v in values}))
    full = invert_probabilities(probs, props, plan, background=not regions)
    labels, compact = invert_compact(probs, props, plan, lm)
    assert compact.dtype == np.float16 and np.array_equal(compact, full.astype(np.float16))
    assert np.array_equal(labels, lm.to_label_map(full)) and labels.dtype == lm.to_label_map(full).dtype


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
    from segplan.runner.preprocessing.resampling import _resample_axes, label_linear, target_shape
    lab = _blobs(np.random.default_rng(seed), shape, classes)
    out_shape = target_shape(shape, old, new)
    ours = label_linear(lab, old, new, out_shape)
    assert np.array_equal(ours, _resample_axes(lab, old, new, out_shape, sitk.sitkLabelLinear))


@pytest.mark.parametrize("old,new,order,aniso", [((1.0, 0.7, 0.7), (2.0, 0.77, 0.77), 3, 3),
                                                 ((4.3, 0.79, 0.79), (3.2, 0.77, 0.77), 3, 3),
                                                 ((1.0, 1.0, 1.0), (1.5, 0.6, 0.8), 1, 1),
                                                 ((0.7, 2.5, 0.7), (0.8, 2.0, 0.8), 3, 3),
                                                 ((0.7, 2.5, 0.7), (0.8, 2.0, 0.8), 3, 1),
                                                 ((0.7, 2.5, 0.7), (0.8, 2.1, 0.8), 1, 0),
                                                 ((1.0, 1.0, 1.0), (1.5, 0.6, 0.75), 0, 0)])
def test_images_resampled_axis_by_axis_equal_simpleitk_in_3d(old, new, order, aniso):
    """Separable: one axis at a time, each as a matrix of SimpleITK's 1D weights (order 0: nearest by
    indexing), gives SimpleITK's 3D B-spline / linear / nearest result (anisotropic cases: as the
    two-step path before, the coarse axis with its own order)."""
    from scipy import ndimage
    from segplan.runner.preprocessing.resampling import _INTERP, _resample_axes, resample, target_shape
    img = ndimage.gaussian_filter(np.random.default_rng(0).normal(size=(20, 40, 36)), 2).astype(np.float32)
    shape = target_shape(img.shape, old, new)
    ours = resample(img, old, new, shape, order, 3.0, aniso)
    coarse = [int(np.argmax(sp)) for sp in (old, new) if max(sp) > 3 * sorted(sp)[1]]
    if not coarse:
        ref = _resample_axes(img, old, new, shape, _INTERP[order])
    else:  # the previous implementation: the other axes in one 3D step, then the coarse axis in another
        a = coarse[-1]
        mid_sp, mid_shape = list(new), list(shape)
        mid_sp[a], mid_shape[a] = old[a], img.shape[a]
        mid = _resample_axes(img, old, mid_sp, mid_shape, _INTERP[order])
        ref = _resample_axes(mid, mid_sp, new, shape, _INTERP[aniso])
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
    both = resample(vec, old, new, shape, order, 3.0, aniso, vector=True)
    assert np.allclose(both[..., 0], ours, atol=1e-5 * np.abs(ours).max())
    assert np.allclose(both[..., 1], -ours, atol=1e-5 * np.abs(ours).max())


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 300), old=st.floats(0.3, 6.0), new=st.floats(0.3, 6.0))
def test_nearest_along_an_axis_by_indexing_equals_simpleitk_but_at_exact_ties(n, old, new):
    import SimpleITK as sitk
    from segplan.runner.preprocessing.resampling import _nearest_along, _resample_axes
    n_out = max(1, int(round(n * old / new)))
    arr = np.arange(n, dtype=np.int16).reshape(n, 1, 1)
    ours = _nearest_along(arr, 0, old, new, n_out).ravel()
    ref = _resample_axes(arr, [old, 1.0, 1.0], [new, 1.0, 1.0], [n_out, 1, 1], sitk.sitkNearestNeighbor).ravel()
    x = (np.arange(n_out) + 0.5) * (new / old) - 0.5
    tie = np.isclose(x - np.floor(x), 0.5, atol=1e-9)
    assert np.array_equal(ours[~tie], ref[~tie])
    assert np.all(np.abs(ours - ref) <= 1)   # at a tie: one of the two equally near slices


def _sitk_reads_outside(x: np.ndarray, n: int, order: int) -> np.ndarray:
    """Output positions (continuous input indices ``x``) where SimpleITK's cubic B-spline cannot be
    an oracle: on a 2-voxel axis at 1 <= x < 1.5 its single mirror reflection sends tap 3 to index
    -1, so its value there depends on whatever precedes the line in memory (the same line of data
    gives 11.07, 11.10 or 11.11 in three volumes, where the mirror spline gives 11.19; over 1500
    random volumes, values up to 2e38). Its coefficients on such an axis can be garbage too: a
    (2, 2, 5) volume once came back as -1e23 at every voxel (hypothesis seed 2300, spacings
    0.52/1.44/2.00 -> 1.39/1.90/1.50 mm), and a (4, 3, 3) volume came back with -3.4e38 (-FLT_MAX) at
    voxels along its 3-voxel axes (seed 709, 0.77/1.67/1.71 -> 1.90/1.37/1.70 mm): a cubic axis of
    fewer than 4 voxels (the spline's support) is left out of the comparison altogether. The operator
    is checked there against scipy's mirror spline instead
    (test_cubic_operator_is_the_mirror_spline_on_axes_of_any_length)."""
    return np.full(np.shape(x), (order == 3) and (n < 4))


_AXIS = st.one_of(st.integers(1, 3), st.integers(4, 24))   # axes of 1, 2 and 3 voxels, often


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 10_000), shape=st.tuples(_AXIS, _AXIS, _AXIS),
       old=st.tuples(*[st.floats(0.5, 2.0)] * 3), new=st.tuples(*[st.floats(0.5, 2.0)] * 3),
       order=st.sampled_from([0, 1, 3]))
def test_axis_by_axis_equals_simpleitk_3d_on_random_grids(seed, shape, old, new, order):
    """Axis by axis (orders 1 and 3: the sparse 1D operator; 0: nearest by indexing) gives SimpleITK's
    3D result on random grids, axes of 1, 2 and 3 voxels included; but at exact edges and ties
    (either answer is right) and where SimpleITK reads outside the image (``_sitk_reads_outside``).

    An output voxel can lie past the input along an axis only where that axis shrinks to one voxel
    longer than the input (1 voxel at 0.5 mm -> 1 at 1.5 mm): there it takes the nearest voxel along
    that axis and is interpolated along the others, where SimpleITK's single 3D call takes the
    nearest voxel along all three; so those are compared with SimpleITK one axis at a time."""
    from segplan.runner.preprocessing.resampling import _INTERP, _resample_axes, _separable, target_shape
    img = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    out_shape = target_shape(shape, old, new)
    ours = _separable(img, list(old), list(new), out_shape, [order] * 3)
    ref = _resample_axes(img, old, new, out_shape, _INTERP[order])
    per_axis, sp, sh = img, list(old), list(shape)
    for a in range(3):
        nxt_sp, nxt_sh = sp[:a] + [new[a]] + sp[a + 1:], sh[:a] + [out_shape[a]] + sh[a + 1:]
        per_axis, sp, sh = _resample_axes(per_axis, sp, nxt_sp, nxt_sh, _INTERP[order]), nxt_sp, nxt_sh
    assert ours.shape == ref.shape == per_axis.shape
    keep, inside = np.ones(ref.shape, bool), np.ones(ref.shape, bool)
    for a in range(3):
        x = (np.arange(out_shape[a]) + 0.5) * (new[a] / old[a]) - 0.5
        drop = np.isclose(x, shape[a] - 0.5, atol=1e-6) | np.isclose(x, -0.5, atol=1e-6)
        drop |= _sitk_reads_outside(x, shape[a], order)
        if order == 0:
            drop |= np.isclose(x - np.floor(x), 0.5, atol=1e-9)
        keep[(slice(None),) * a + (drop,)] = False
        inside[(slice(None),) * a + ((x < -0.5) | (x > shape[a] - 0.5),)] = False
    tol = 1e-4 * max([1.0, *np.abs(ref[keep]).ravel()])  # the scale of the compared voxels, not of garbage
    assert np.allclose(ours[keep & inside], ref[keep & inside], atol=tol)
    assert np.allclose(ours[keep], per_axis[keep], atol=tol)


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.one_of(st.integers(1, 3), st.integers(4, 60)),
       old=st.floats(0.3, 4.0), new=st.floats(0.3, 4.0))
def test_cubic_operator_is_the_mirror_spline_on_axes_of_any_length(seed, n, old, new):
    """The cubic operator is the B-spline of the mirror-extended samples (scipy.ndimage's
    map_coordinates, mode='mirror', computed independently) at every output voxel inside the input,
    2-voxel axes included: there the operator built from a resampled 2x2 identity was off by up to
    0.08 on unit-variance data (SimpleITK's index -1 read whatever lay before the identity's rows)."""
    from scipy import ndimage
    from segplan.runner.preprocessing.resampling import _axis_operator, target_shape
    data = np.random.default_rng(seed).normal(size=n)
    n_out = target_shape([n], [old], [new])[0]
    x = (np.arange(n_out) + 0.5) * (new / old) - 0.5
    inside = (x >= -0.5) & (x < n - 0.5)
    op = _axis_operator(n, n_out, old, new, 3)
    ours = op.T @ data
    ref = ndimage.map_coordinates(data, x[None], order=3, mode="mirror")
    assert np.allclose(ours[inside], ref[inside], atol=1e-5 * max(1.0, np.abs(data).max()))
    # outside the input: the nearest edge voxel (SimpleITK's nearest-neighbour extrapolator)
    assert np.array_equal(ours[~inside], data[np.where(x[~inside] < 0, 0, n - 1)])


@pytest.mark.parametrize("sp_out", [0.5, 2.0, 0.77])
def test_long_axis_operator_is_banded_and_equals_simpleitk(sp_out):
    """A 3000-voxel axis: the operator holds a bounded number of weights per output voxel (its
    size grows with the axis, not its square: the dense one was 3000 x 6000 floats) and gives
    SimpleITK's 1D result all along it (B-spline prefilter, mirror edges and extrapolation)."""
    from scipy import sparse
    from segplan.runner.preprocessing.resampling import _INTERP, _axis_operator, _resample_axes, target_shape
    n = 3000
    data = np.random.default_rng(1).normal(size=(1, 1, n)).astype(np.float32)
    n_out = target_shape([n], [1.0], [sp_out])[0]
    for order in (1, 3):
        op = _axis_operator(n, n_out, 1.0, sp_out, order)
        assert sparse.issparse(op) and op.shape == (n, n_out)
        assert op.nnz <= (2 if order == 1 else 40) * n_out
        ref = _resample_axes(data, [1.0, 1.0, 1.0], [1.0, 1.0, sp_out], [1, 1, n_out], _INTERP[order]).ravel()
        assert np.allclose(op.T @ data.ravel(), ref, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_long_axes_go_by_blocks_with_the_same_result(axis):
    """The banded operator applied block by block (only the input rows each block reads) equals the
    whole matrix product, on every axis, for images and probability vectors."""
    from segplan.runner.preprocessing.resampling import _apply_along, _axis_operator
    rng = np.random.default_rng(axis)
    arr = rng.normal(size=(30, 34, 38, 2)).astype(np.float32)
    op = _axis_operator(arr.shape[axis], arr.shape[axis] * 2 - 3, 1.0, 0.5, 3)
    whole = np.moveaxis(np.moveaxis(arr, axis, -1) @ op.toarray(), -1, axis)
    for block in (7, 16, 1000):
        assert np.allclose(_apply_along(arr, axis, op, block=block), whole, atol=1e-5)
        assert np.allclose(_apply_along(arr[..., 0], axis, op, block=block), whole[..., 0], atol=1e-5)
