"""Shared fixtures: small phantom datasets made once per session, and the shared real data, which
skips where absent (a user's clone) but fails under CI so CI never skips silently."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import segplan  # noqa: F401  first, as a user's script: its TensorFlow settings (oneDNN) before TensorFlow

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_dataset(name: str) -> Path:
    path = SHARED / name
    if not path.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing, and CI must not skip: copy shared/ beside the checkout")
        pytest.skip(f"{path} not present (the shared data lives beside the checkout)")
    return path


@pytest.fixture(scope="session")
def hippocampus() -> Path:
    return shared_dataset("Dataset004_Hippocampus")


@pytest.fixture(scope="session")
def ct_example() -> Path:
    return shared_dataset("ct_example")


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory) -> Path:
    """8 tiny phantoms (both HU and windowed cases)."""
    from segplan.datasets.phantoms import make_phantoms
    return make_phantoms(tmp_path_factory.mktemp("phantoms") / "ds", cases=8, seed=3, scale=0.12, progress=False)


@pytest.fixture(scope="session")
def trained_cv(phantoms, tmp_path_factory) -> Path:
    """A tiny plan's two folds trained, predicted and summarized once per session (the plan's path).
    Tests read it and write their outputs elsewhere."""
    pytest.importorskip("keras")
    from segplan.runner.cli import main
    from tests.tiny import tiny_plan
    plan_path = tiny_plan(phantoms, tmp_path_factory.mktemp("trained_cv") / "plans" / "cv.yaml", epochs=2,
                          iterations=3, folds=2)
    for k in (0, 1):
        assert main(["run", str(plan_path), "--fold", str(k)]) == 0
    assert main(["summarize", str(plan_path)]) == 0
    return plan_path
