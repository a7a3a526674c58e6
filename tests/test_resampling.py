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
from runner.preprocess import invert_probabilities, preprocess_image, resample

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
