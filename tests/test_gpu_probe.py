"""`segplan plan --probe`: the GPU plan fitted by measured peaks (planner/probing.py).

The search is tested against a simulated device whose true peak differs from the memory model by a
known factor (the model was fitted on one card and backend; another can differ either way): the
chosen plan must fit the budget less the margin, use most of it, and the search must end. The child
probe itself runs for real (on a CPU it reports seconds and no GPU peak)."""
import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from segplan.planner import probing
from segplan.planner.build import make_plan
from segplan.planner.layouts import load_dataset
from segplan.planner.fingerprint import (
    FINGERPRINT_VERSION, CaseFingerprint, ChannelStats, Fingerprint, compute_fingerprint)
from segplan.planner.memory import OVERHEAD_GB, estimate_for_plan
from segplan.planner.plan_file import load_plan


@pytest.fixture(scope="module")
def fingerprint(phantoms):
    return compute_fingerprint(load_dataset(phantoms), progress=False)


def _chest_ct(n_cases=10):
    """A fingerprint of full-size chest CTs (the phantoms are too small to fill a GPU)."""
    cases = [CaseFingerprint(f"c{i:03d}", [1.0, 0.78, 0.78], [300 + 10 * i, 512, 512], [300 + 10 * i, 512, 512],
                             [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0], ["hu"], [100, 10, 1]) for i in range(n_cases)]
    ch = [ChannelStats("CT", True, -300.0, 400.0, -1000.0, 1500.0, -950.0, -200.0, 900.0, 1000)]
    return Fingerprint(FINGERPRINT_VERSION, "chest", ["CT"], {"background": 0, "lung": 1, "lesion": 2},
                       [-1250.0, 250.0], cases, ch, [0.9, 0.09, 0.01], [n_cases] * 3)


def _replan(fp, budget):
    def replan(model_gb):
        plan, reasons = make_plan(fp, "p", "ds", "work", model_gb, "test")
        return plan.replace(memory=dataclasses.replace(plan.memory, gpu_memory_gb=budget)), reasons
    return replan


def _device(factor, capacity=None):
    """A GPU whose peak is ``factor`` x the model's activations and weights (+ the same overhead);
    above ``capacity`` GB it runs out of memory. Records every plan it measured."""
    seen = []

    def measure(plan):
        seen.append(plan)
        peak = (estimate_for_plan(plan) - OVERHEAD_GB) * factor + OVERHEAD_GB
        if capacity is not None and peak > capacity:
            return {"seconds": None, "peak_gb": None, "oom": True}, ""
        return {"seconds": 0.1, "peak_gb": peak, "oom": False}, ""
    return measure, seen


@settings(max_examples=40, deadline=None)
@given(factor=st.floats(0.5, 3.0), budget=st.floats(4.0, 80.0))
def test_probe_fits_the_measured_peak_into_the_budget(factor, budget):
    measure, seen = _device(factor)
    plan, reasons, peak, lines = probing.fit_by_probe(_replan(_chest_ct(), budget), budget, measure)
    target = budget * (1 - probing.PROBE_MARGIN)
    assert len(seen) <= probing.MAX_GPU_PROBES and len(lines) == len(seen)
    assert peak is not None and peak <= target
    true_peak = (estimate_for_plan(plan) - OVERHEAD_GB) * factor + OVERHEAD_GB
    assert abs(true_peak - peak) < 0.01          # the figure kept is the chosen plan's own measurement
    # most of the budget is used, whichever way the model erred (over 70% in most cases; the patch moves
    # in steps of its pooling multiple, so the nearest plan below the target can be further down)
    assert peak >= 0.6 * budget
    first = seen[0]
    if (estimate_for_plan(first) - OVERHEAD_GB) * factor + OVERHEAD_GB > target:
        # the model under-estimated: the first plan would not fit, the chosen one is smaller
        assert math.prod(first.training.patch_size) * first.training.batch_size > \
            math.prod(plan.training.patch_size) * plan.training.batch_size


def test_out_of_memory_probes_shrink_the_plan(fingerprint):
    measure, seen = _device(1.0, capacity=4.0)
    plan, _, peak, lines = probing.fit_by_probe(_replan(_chest_ct(), 8.0), 8.0, measure)
    assert "out of memory" in lines[0]
    assert peak is not None and peak <= 4.0 and len(seen) >= 2


def test_a_failed_probe_keeps_the_model_plan_and_says_why(fingerprint):
    plan, reasons, peak, lines = probing.fit_by_probe(_replan(fingerprint, 8.0), 8.0,
                                                      lambda p: (None, "the probe failed: boom"))
    assert peak is None and "boom" in lines[0] and lines[-1].startswith("DOES NOT FIT")
    assert plan == _replan(fingerprint, 8.0)(8.0)[0]


def test_plan_probe_without_a_gpu_falls_back_to_the_model_and_says_so(phantoms, tmp_path):
    from segplan.planner.build import gpu_present
    if gpu_present():
        pytest.skip("this machine has a GPU: the fallback is for machines without one")
    from segplan.planner.planning import check_plan_report, plan_dataset
    out = plan_dataset(phantoms, tmp_path / "g.yaml", gpu_memory=8, device="gpu", progress=False, gpu_probe=True)
    text = out.read_text()
    assert load_plan(out).memory.measured_gb is None
    assert "not measured: --probe found no GPU here" in text
    assert "measured by --probe" not in check_plan_report(out)


def test_child_probe_reports_seconds_and_no_gpu_peak_on_a_cpu(fingerprint):
    plan, _ = make_plan(fingerprint, "p", "ds", "work", 8.0, "test")
    small = plan.replace(network=dataclasses.replace(plan.network, filters=[4] * len(plan.network.filters)),
                         training=dataclasses.replace(plan.training, patch_size=[16, 32, 32], batch_size=1))
    m, why = probing.measure_plan(small)
    assert why == "" and m["seconds"] > 0 and m["oom"] is False
    from segplan.planner.build import gpu_present
    assert (m["peak_gb"] is None) != gpu_present()

