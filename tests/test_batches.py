"""Batches from worker processes (issue 15): the same batches whatever the number of workers, and a
worker that fails stops training with its error instead of hanging."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from segplan.planner.plan_file import load_plan
from segplan.runner.training.batches import batch_stream
from segplan.runner.preprocessing.preprocess import preprocess_dataset
from segplan.runner.workspace import Workspace
from tests.test_planner_properties import deadline
from tests.tiny import tiny_plan


@pytest.fixture(scope="module")
def prepared(phantoms, tmp_path_factory):
    plan_path = tiny_plan(phantoms, tmp_path_factory.mktemp("b") / "p.yaml")
    plan = load_plan(plan_path)
    aug = dataclasses.replace(plan.training.augmentation,
                              **{f: 0.5 for f in vars(plan.training.augmentation) if f.endswith("_p")})
    plan = plan.replace(training=dataclasses.replace(plan.training, augmentation=aug))
    ws = Workspace(plan_path, plan)
    return ws, preprocess_dataset(ws, workers=1, progress=False)


def _epochs(ws, pre, workers: int) -> list:
    ids = [c.case_id for c in ws.dataset.cases]
    with deadline(120), batch_stream(pre, ids, ws.plan, 1, workers) as epoch_batches:
        return [b for e in (0, 3) for b in epoch_batches(e, 5)]


def test_batches_do_not_depend_on_the_number_of_workers(prepared):
    ws, pre = prepared
    thread, one, two = _epochs(ws, pre, 0), _epochs(ws, pre, 1), _epochs(ws, pre, 2)
    assert len(thread) == 10 and thread[0][0].shape == (2, 8, 32, 32, 1) and thread[0][1].shape == (2, 8, 32, 32, 4)
    for (xa, ya), (xb, yb), (xc, yc) in zip(thread, one, two):
        assert np.array_equal(xa, xb) and np.array_equal(xa, xc)
        assert np.array_equal(ya, yb) and np.array_equal(ya, yc)
    assert not np.array_equal(thread[0][0], thread[5][0])   # another epoch, other batches


def test_a_failing_worker_stops_with_its_error(prepared):
    ws, pre = prepared
    with deadline(120), pytest.raises(RuntimeError, match="a batch worker died"):
        with batch_stream(pre, ["no_such_case"], ws.plan, 0, 2) as epoch_batches:
            list(epoch_batches(0, 4))


def test_next_epochs_first_batches_are_made_ahead_and_are_the_same(prepared, monkeypatch):
    """While the last steps of an epoch run (and validation, checkpoints), the next epoch's first
    batches are already being made; they are the very batches a fresh stream would make."""
    import time
    import segplan.runner.training.batches as B
    ws, pre = prepared
    ids = [c.case_id for c in ws.dataset.cases]
    made = []
    real = B.augmented_batch
    monkeypatch.setattr(B, "augmented_batch", lambda s, a, p, f, e, i: made.append((e, i)) or real(s, a, p, f, e, i))
    with deadline(120), batch_stream(pre, ids, ws.plan, 1, 0) as epoch_batches:
        first = list(epoch_batches(0, 2))
        time.sleep(1.0)
        assert (1, 0) in made, "the next epoch's first batch was not made ahead"
        second = list(epoch_batches(1, 2))
    with batch_stream(pre, ids, ws.plan, 1, 2) as fresh:
        expected = list(fresh(1, 2))
    assert len(first) == len(second) == 2
    for (xa, ya), (xb, yb) in zip(second, expected):
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
