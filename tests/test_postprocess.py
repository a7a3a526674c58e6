"""Postprocessing decided on cross-validation (issue 13): the largest-component rules the folds'
predictions support are kept, the ones that would delete real structures are not, and the decision
file is checked like a plan."""
from __future__ import annotations

import numpy as np
import pytest

from planner.dataset import Geometry, write_volume
from planner.schema import SchemaError
from runner.postprocess import apply, decide, keep_largest, load, save
from runner.workspace import Workspace
from tests.tiny import tiny_plan


def test_keep_largest_removes_only_the_smaller_pieces_of_its_labels():
    lab = np.zeros((6, 10, 10), np.uint8)
    lab[1:4, 1:5, 1:5] = 1
    lab[5, 8, 8] = 1                     # a stray voxel of 1
    lab[1:3, 7:9, 1:3] = 2               # another label, separate
    out = keep_largest(lab, [1])
    assert out[5, 8, 8] == 0 and (out == 1).sum() == 3 * 4 * 4 and (out == 2).sum() == (lab == 2).sum()


def _case(stray: bool) -> tuple[np.ndarray, np.ndarray]:
    ref = np.zeros((12, 20, 30), np.uint8)
    ref[2:10, 3:17, 2:12] = 1            # left lung
    ref[2:10, 3:17, 16:27] = 2           # right lung, not touching the left
    ref[4:7, 6:10, 4:8] = 3              # infection in the left lung ...
    ref[4:7, 6:10, 19:23] = 3            # ... and in the right one: two components that are real
    pred = ref.copy()
    if stray:
        pred[0:2, 18:20, 13:15] = 1      # a false positive of 'left lung' outside both lungs
    return pred, ref


def test_decision_keeps_what_helps_and_rejects_what_deletes_structures(phantoms, tmp_path):
    ws = Workspace(tiny_plan(phantoms, tmp_path / "p.yaml"))
    g = Geometry((2.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), (12, 20, 30))
    for fold in ws.folds():
        fold.validation_reference.mkdir(parents=True)
        for i in range(2):
            pred, ref = _case(stray=i == 0)
            write_volume(pred, g, fold.validation / f"c{fold.index}{i}.nii.gz")
            write_volume(ref, g, fold.validation_reference / f"c{fold.index}{i}.nii.gz")
        fold.validation_summary.write_text("cases: 2\n")
    post = decide(ws)
    # all foreground together would delete a whole lung (the lungs do not touch): rejected; the left
    # lung alone loses its stray piece: kept; infection has two real lesions: rejected
    assert [r.keep_largest for r in post.rules] == ["left_lung"]
    assert post.folds == [0, 1]
    assert post.tried["foreground"]["left_lung"][1] < post.tried["foreground"]["left_lung"][0]   # the smaller lung gone
    before, after = post.tried["left_lung"]["left_lung"]
    assert after > before
    assert post.tried["infection"]["infection"][1] < post.tried["infection"]["infection"][0]
    assert post.tried["lungs"]["right_lung"][1] < 1.0 or post.tried["lungs"]["left_lung"][1] < 1.0
    pred, ref = _case(stray=True)
    assert np.array_equal(apply(pred, post), ref)
    # the file round-trips and is checked like a plan
    save(post, ws.postprocessing)
    assert load(ws.postprocessing, ws.plan.dataset.labels) == post
    ws.postprocessing.write_text(ws.postprocessing.read_text().replace("labels: [1]", "labels: [1, 9]"))
    with pytest.raises(SchemaError, match=r"rules\.0\.labels: \[9\] are not foreground label values"):
        load(ws.postprocessing, ws.plan.dataset.labels)
