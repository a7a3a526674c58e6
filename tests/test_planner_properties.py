"""Property tests of the planner (hypothesis): for every fingerprint it ends within a second, and the
plan it writes is one `segplan check` accepts, whose patch fits the pooling and the median image and
whose memory estimate (GPU plans) is within the budget or says that it is not."""
from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segplan.planner import heuristics as H
from segplan.planner.build import make_plan
from segplan.planner.cpu_plan import make_cpu_plan
from segplan.planner.fingerprint import FINGERPRINT_VERSION, CaseFingerprint, ChannelStats, Fingerprint
from segplan.planner.plan import pool_divisor
from segplan.planner.plan_file import load_plan, save_plan
from segplan.planner.planning import check_plan_report


@contextlib.contextmanager
def deadline(seconds: float):
    """Fail (instead of hanging the suite) when the block runs longer than ``seconds``."""
    def stop(*_):
        raise TimeoutError(f"still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("median,budget", [([3, 400, 400], 1.5), ([1, 600, 600], 2.0), ([2, 3, 900], 0.25),
                                           ([1, 1, 1], 0.1), ([1000, 1000, 1000], 80.0)])
def test_fit_ends_for_the_shapes_that_hung(median, budget):
    reasons: dict = {}
    with deadline(5):
        fit = H.fit_patch_and_batch(median, [1.0, 1.0, 1.0], budget, 1, 3, 1e8, reasons)
    assert all(p <= max(m, 1) * 2 for p, m in zip(fit["patch"], median))
    assert fit["fits"] == (fit["estimate"] <= budget)
    if not fit["fits"]:
        assert "DOES NOT FIT" in reasons["memory.estimate_gb"] and str(fit["patch"]) in reasons["memory.estimate_gb"]


def _dataset(root: Path, n: int) -> Path:
    """A dataset folder with n cases (empty files: `check` lists cases, it does not read them)."""
    ds = root / f"ds{n}"
    if not ds.exists():
        (ds / "imagesTr").mkdir(parents=True)
        (ds / "labelsTr").mkdir()
        for i in range(n):
            (ds / "imagesTr" / f"c{i:03d}_0000.nii.gz").touch()
            (ds / "labelsTr" / f"c{i:03d}.nii.gz").touch()
        (ds / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0},
                                                     "file_ending": ".nii.gz"}))
    return ds


@st.composite
def fingerprints(draw):
    n_cases = draw(st.integers(2, 6))
    n_ch = draw(st.integers(1, 4))
    n_cls = draw(st.integers(2, 20))
    base_shape = [draw(st.integers(1, 1000)) for _ in range(3)]
    base_sp = [draw(st.floats(0.05, 10.0)) for _ in range(3)]
    cases = []
    for i in range(n_cases):
        f = draw(st.floats(0.8, 1.2))
        shape = [max(1, min(1000, int(round(s * f)))) for s in base_shape]
        sp = [min(10.0, max(0.05, s * draw(st.floats(0.9, 1.1)))) for s in base_sp]
        cases.append(CaseFingerprint(f"c{i:03d}", sp, shape, shape, [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0],
                                     ["hu"] + ["other"] * (n_ch - 1), [100] * n_cls))
    channels = [ChannelStats("CT" if c == 0 else f"ch{c}", c == 0, -300.0, 400.0, -1000.0, 1500.0, -950.0, -200.0,
                             900.0, 1000) for c in range(n_ch)]
    labels = {"background": 0} | {f"l{k}": k for k in range(1, n_cls)}
    return Fingerprint(FINGERPRINT_VERSION, "x", [c.name for c in channels], labels, [-1250.0, 250.0], cases,
                       channels, [1.0 / n_cls] * n_cls, [n_cases] * n_cls)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(fp=fingerprints(), budget=st.floats(0.1, 80.0), preset=st.sampled_from(["default", "cpu"]))
def test_every_fingerprint_gets_a_checkable_plan_in_under_a_second(tmp_path_factory, fp, budget, preset):
    root = tmp_path_factory.getbasetemp() / "prop"
    root.mkdir(exist_ok=True)
    ds = _dataset(root, len(fp.cases))
    t = time.perf_counter()
    with deadline(10):
        if preset == "cpu":
            plan, reasons = make_cpu_plan(fp, "p", ds.name, "work", probe=False, memory_gb=budget)
        else:
            plan, reasons = make_plan(fp, "p", ds.name, "work", budget, "test", preset=preset)
    assert time.perf_counter() - t < 1.0
    tr = plan.training
    div = pool_divisor(plan.network)
    median = H.median_resampled_shape(fp, plan.resampling.target_spacing)
    for p, m, d in zip(tr.patch_size, median, div):
        assert p % d == 0
        assert p <= max(d, math.ceil(math.ceil(m) / d) * d), (tr.patch_size, median, div)
    assert tr.batch_size >= (2 if preset == "default" else 1)
    est = plan.memory.estimate_gb
    if preset == "cpu":  # the whole run's memory; the budget was only the patch's size proxy
        from segplan.planner.memory import CPU_PROCESS_GB, estimate_for_plan
        assert est >= estimate_for_plan(plan) >= CPU_PROCESS_GB and "whole `segplan run`" in reasons["memory.estimate_gb"]
    else:
        assert est <= budget + 0.01 or "DOES NOT FIT" in reasons.get("memory.estimate_gb", "")
    assert plan.cross_validation.folds <= len(fp.cases)
    out = root / f"plan_{preset}.yaml"
    save_plan(plan, out, reasons)
    report = check_plan_report(out)
    assert "valid plan" in report


@settings(max_examples=25, deadline=None)
@given(fp=fingerprints(), minutes=st.floats(0.5, 60.0))
def test_cpu_plans_end_and_validate_without_a_probe(fp, minutes):
    with deadline(10):
        plan, reasons = make_cpu_plan(fp, "p", "ds", "work", time_budget=minutes, probe=False)
    s = plan.training.schedule
    assert plan.device == "cpu" and s.time_budget_minutes == pytest.approx(minutes)
    # the budget ends the run: early stopping would keep weights of a learning rate not yet decayed
    assert s.early_stopping_patience >= s.max_epochs
    assert all(p % d == 0 for p, d in zip(plan.training.patch_size, pool_divisor(plan.network)))


@settings(max_examples=60, deadline=None)
@given(median=st.lists(st.floats(4.0, 300.0), min_size=3, max_size=3), cover=st.floats(0.5, 0.99))
def test_a_cpu_patch_rounds_the_median_down_only_while_it_covers_min_cover_of_it(median, cover):
    """With memory to spare nothing is shrunk: each axis is the multiple of its pooling just below the
    median where that still covers ``cover`` of it, else the one above (nnU-Net's, and a GPU plan's)."""
    spacing = [1.0, 1.0, 1.0]
    cpu = H.fit_patch_and_batch(median, spacing, 1e4, 1, 3, 1e12, {}, first=8, cap=64, min_cover=cover)
    gpu = H.fit_patch_and_batch(median, spacing, 1e4, 1, 3, 1e12, {}, first=8, cap=64)
    for p, g, m, d in zip(cpu["patch"], gpu["patch"], median, pool_divisor(cpu["network"])):
        below = math.ceil(m) // d * d
        assert p % d == 0 and p in (below, g)
        assert (p == below) == (below >= max(d, cover * m)), (median, cpu["patch"], gpu["patch"])
    assert H.fit_patch_and_batch([36, 50, 35], spacing, 1e4, 1, 3, 1e12, {}, first=8, cap=64,
                                 min_cover=0.85)["patch"] == [32, 48, 32]  # Hippocampus' median image


def _mr_fingerprint(cases: int, side: int) -> Fingerprint:
    """A one-channel MR fingerprint of ``cases`` cubes of ``side`` voxels at 1 mm, one foreground class."""
    fp_cases = [CaseFingerprint(f"c{i}", [1.0] * 3, [side] * 3, [side] * 3, [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0],
                                ["other"], [10, 10]) for i in range(cases)]
    ch = [ChannelStats("MR", False, 0.0, 1.0, 0.0, 1.0, 0.0, 0.5, 1.0, 10)]
    return Fingerprint(FINGERPRINT_VERSION, "x", ["MR"], {"background": 0, "a": 1}, [-1250.0, 250.0], fp_cases, ch,
                       [0.5, 0.5], [2, 2])


def test_too_few_cases_for_the_folds(tmp_path):
    fp = _mr_fingerprint(2, 20)
    ds = _dataset(tmp_path, 2)
    plan, reasons = make_plan(fp, "p", ds.name, "work", 8.0, "test")
    assert plan.cross_validation.folds == 2 and "only 2 cases" in reasons["cross_validation.folds"]
    out = tmp_path / "p.yaml"
    save_plan(plan.replace(cross_validation=plan.cross_validation.__class__(5, 1)), out)
    from segplan.planner.schema import SchemaError
    with pytest.raises(SchemaError, match=r"cross_validation.folds: 5 folds need at least as many cases; the dataset has 2"):
        load_plan(out)
    with pytest.raises(ValueError, match="at least 2"):
        make_plan(fp.__class__(**{**fp.__dict__, "cases": fp.cases[:1]}), "p", "ds", "work", 8.0, "test")
    assert np.isfinite(plan.memory.estimate_gb)


@pytest.mark.parametrize("step_s, expected", [(0.01, "chose the widest reaching"), (5.0, "none reaches")])
def test_the_width_reason_says_when_no_width_buys_enough_iterations(monkeypatch, step_s, expected):
    """The demo's 3-minute budget: every width too slow for MIN_ITERATIONS, so the fastest is taken,
    and the plan must not claim it reaches them."""
    import segplan.planner.cpu_plan as cp
    fp = _mr_fingerprint(5, 40)
    monkeypatch.setattr(cp, "run_probe", lambda candidates, *a, **k: (
        [{"seconds": step_s * (i + 1), "window_seconds": 0.01, "oom": False} for i in range(len(candidates))], ""))
    plan, reasons = make_cpu_plan(fp, "p", "ds", "work", time_budget=3.0)
    assert expected in reasons["network.filters"]
    assert plan.network.filters[0] == (cp.WIDTHS[-1] if step_s < 1 else cp.WIDTHS[0])
