"""plan -> run fold 0 and 1 -> predict -> summarize on tiny phantoms, through the command line."""
import csv
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import yaml

from segplan.planner.layouts import load_dataset
from segplan.planner.plan_file import load_plan, save_plan
from segplan.runner.cli import main
from tests.tiny import tiny_plan

pytest.importorskip("keras")


def json_load(path: Path) -> dict:
    import json
    return json.loads(path.read_text())


@pytest.mark.e2e
def test_plan_run_predict_summarize(phantoms, tmp_path):
    plan_path = tiny_plan(phantoms, tmp_path / "plans" / "ph.yaml", epochs=2, iterations=3, folds=2)
    assert main(["check", str(plan_path)]) == 0
    assert main(["run", str(plan_path), "--fold", "0"]) == 0
    plan = load_plan(plan_path)
    work = plan_path.parent / plan.dataset.work_dir
    fold0 = work / "fold_0"
    for f in ("plan.yaml", "checkpoint_latest.json", "checkpoint_best.weights.h5", "history.csv", "progress.png",
              "finished.json", "validation/metrics.csv", "validation/summary.yaml"):
        assert (fold0 / f).exists(), f
    with open(fold0 / "history.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    assert any((fold0 / "tensorboard").iterdir())
    # the CV figures come from the final weights, and the fold's summary says so
    val = yaml.safe_load((fold0 / "validation" / "summary.yaml").read_text())
    assert val["checkpoint"] == "final" and val["missing_predictions"] == [] and val["selection_note"] == ""
    assert {"lungs", "lungs_union", "left_lung", "right_lung"} <= set(val["classes"])
    # a finished fold says so and does nothing
    before = (fold0 / "history.csv").read_text()
    assert main(["run", str(plan_path), "--fold", "0"]) == 0
    assert (fold0 / "history.csv").read_text() == before
    # a hand edit is honoured: 3 epochs instead of 2 after --restart of the finished fold 0
    plan3 = plan.replace(training=dataclasses.replace(plan.training, schedule=dataclasses.replace(
        plan.training.schedule, max_epochs=3)))
    save_plan(plan3, plan_path)
    assert main(["run", str(plan_path), "--fold", "0", "--restart"]) == 0
    with open(fold0 / "history.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [0, 1, 2]
    assert json_load(fold0 / "finished.json")["epochs"] == 3
    assert main(["run", str(plan_path), "--fold", "1"]) == 0
    with open(work / "fold_1" / "history.csv") as f:
        assert len(list(csv.DictReader(f))) == 3
    # summary: the Table-1 layout, box plots, overlays, quantification
    assert main(["summarize", str(plan_path)]) == 0
    summary = yaml.safe_load((work / "cv_summary.yaml").read_text())
    assert set(summary["folds"]) == {"fold 0", "fold 1", "average"} and summary["missing_folds"] == []
    assert "lungs" in summary["folds"]["average"] and "dice" in summary["folds"]["average"]["lungs"]
    assert "lungs_union" in summary["folds"]["average"]
    report = (work / "cv_summary.md").read_text()
    # postprocessing decided on the folds' predictions, written beside the report, applied by predict
    from segplan.runner.postprocessing.postprocess import load
    post = load(work / "postprocessing.yaml", plan.dataset.labels)
    assert post.folds == [0, 1] and set(post.tried) >= {"foreground", "left_lung", "lungs"}
    assert bool(summary["folds_postprocessed"]) == bool(post.rules)
    assert ("average (postprocessed)" in report) == bool(post.rules)
    assert "postprocessing decided on folds [0, 1]" in report
    assert "mean of left_lung and right_lung" in report and "fold 1: predicted with the final checkpoint" in report
    assert (work / "cv_boxplots.png").stat().st_size > 1000 and len(list((work / "overlays").glob("*.png"))) == 2
    with open(work / "quantification.csv") as f:
        q = list(csv.DictReader(f))
    assert len(q) == 8 and "infection_percent_of_lungs" in q[0]
    # predict on new inputs: an anisotropic, flipped-direction copy of a case keeps its exact geometry
    case = load_dataset(phantoms).cases[0]
    import SimpleITK as sitk
    img = sitk.ReadImage(str(case.image_files[0]))
    img.SetDirection((-1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, -1.0, 0.0))
    img.SetOrigin((5.0, -3.0, 12.5))
    inp = tmp_path / "in"
    inp.mkdir()
    sitk.WriteImage(img, str(inp / "new_0000.nii.gz"))
    out = tmp_path / "out"
    assert main(["predict", str(plan_path), "-i", str(inp), "-o", str(out), "--save-probabilities"]) == 0
    assert main(["predict", str(plan_path), "-i", str(inp), "-o", str(tmp_path / "raw"), "--no-postprocessing"]) == 0
    pred = sitk.ReadImage(str(out / "new.nii.gz"))
    assert pred.GetSize() == img.GetSize() and np.allclose(pred.GetSpacing(), img.GetSpacing())
    assert np.allclose(pred.GetOrigin(), img.GetOrigin()) and np.allclose(pred.GetDirection(), img.GetDirection())
    assert set(np.unique(sitk.GetArrayFromImage(pred))) <= {0, 1, 2, 3}
    with np.load(out / "new.npz") as z:
        assert z["probabilities"].shape == (4,) + sitk.GetArrayFromImage(img).shape
    # wrong channel count is refused naming the file
    two = tmp_path / "two"
    two.mkdir()
    sitk.WriteImage(img, str(two / "x_0000.nii.gz"))
    sitk.WriteImage(img, str(two / "x_0001.nii.gz"))
    assert main(["predict", str(plan_path), "-i", str(two), "-o", str(tmp_path / "o2")]) == 2
    # evaluate from the command line
    assert main(["evaluate", "--pred", str(fold0 / "validation"), "--ref", str(phantoms / "labelsTr"),
                 "--plan", str(plan_path)]) == 0
