"""The planner's memory model against the GPU measurements committed in benchmarks/results (issue
15): every measured point over 1 GB within 10% of the estimate (less the fixed CUDA-context
overhead, which an allocator's peak does not count), for float32 and mixed precision."""
from __future__ import annotations

import pytest

from benchmarks.memory_fit import MIN_GB, fit, points
from planner.memory import GB, GPU_BYTES_PER_ACTIVATION


def test_constants_are_the_fit_of_the_measurements():
    rows = points()
    for mixed in (False, True):
        assert GPU_BYTES_PER_ACTIVATION[mixed] == pytest.approx(fit(rows, mixed), rel=0.02)


def test_every_large_measured_point_within_ten_percent():
    rows = [r for r in points() if r["measured_gb"] > MIN_GB]
    assert len(rows) >= 8
    for r in rows:
        est = (r["activations"] * GPU_BYTES_PER_ACTIVATION[r["mixed"]] + r["weight_bytes"]) / GB
        assert est == pytest.approx(r["measured_gb"], rel=0.10), (r["patch"], r["batch"], r["precision"])
