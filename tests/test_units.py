"""Right answers on images it has not seen (issue 19, point 1): a new image is read in the unit
its own values show, whatever its file is called. The plan's per-case table
(intensity.conventions) is for the training cases it was written for, and a bundle does not carry
it (tests/test_bundle.py); an input whose unit cannot be told is named in a warning."""
from __future__ import annotations

import shutil

import numpy as np
import SimpleITK as sitk

from segplan.planner.dataset import Case, read_image
from segplan.planner.layouts import load_dataset
from segplan.planner.plan_file import load_plan
from segplan.planner.planning import plan_dataset


def _plan_and_cases(phantoms, tmp_path):
    """The phantoms' plan, one of its windowed training cases and one of its HU cases."""
    plan = load_plan(plan_dataset(phantoms, tmp_path / "p.yaml", gpu_memory=4, progress=False))
    conv = plan.intensity.conventions
    windowed = next(c for c, v in sorted(conv.items()) if v == "windowed")
    hu = next(c for c, v in sorted(conv.items()) if v == "hu")
    return plan, windowed, next(c for c in load_dataset(phantoms).cases if c.case_id == hu)


def _threshold_predictor(n_classes: int):
    """A stand-in network that only looks at the input: class 1 where the normalised value is
    above the dataset mean, else background (one-hot, (b, c, ...) -> (b, k, ...))."""
    def predict(batch):
        fg = (batch[:, 0] > 0).astype(np.float32)
        out = np.zeros((batch.shape[0], n_classes) + batch.shape[2:], np.float32)
        out[:, 0], out[:, 1] = 1 - fg, fg
        return out
    return predict


def test_a_new_image_named_like_a_windowed_training_case_keeps_its_own_unit(phantoms, tmp_path):
    from segplan.runner.inference.case import predict_case
    from segplan.runner.preprocessing.preprocess import preprocess_image
    plan, windowed, hu_case = _plan_and_cases(phantoms, tmp_path)
    image, geom = read_image(hu_case)
    # the same HU file under a windowed training case's name and under a new name: the same input
    borrowed, _, props = preprocess_image(image.copy(), geom, plan, windowed)
    own, _, _ = preprocess_image(image.copy(), geom, plan, "new_case")
    assert np.array_equal(borrowed, own)
    assert props["conventions"] == ["hu"]
    # ... and so the same labels, through the whole predict path (a threshold stands in for the network)
    inp = tmp_path / "in"
    inp.mkdir()
    for name in (f"{windowed}_0000.nii.gz", "someone_else_0000.nii.gz"):
        shutil.copy(hu_case.image_files[0], inp / name)
    predict = _threshold_predictor(len(plan.dataset.labels))
    a = predict_case(Case(windowed, (inp / f"{windowed}_0000.nii.gz",), None), plan, predict)[0]
    b = predict_case(Case("someone_else", (inp / "someone_else_0000.nii.gz",), None), plan, predict)[0]
    assert a.any() and int(np.count_nonzero(a != b)) == 0
    # the training case itself is still read in the plan's unit for it (a hand edit wins for it)
    _, _, props = preprocess_image(image.copy(), geom, plan, windowed, training_case=True)
    assert props["conventions"] == ["windowed"]


def test_an_input_whose_unit_cannot_be_told_is_named_in_a_warning(phantoms, tmp_path, capsys):
    from segplan.runner.inference.case import predict_case
    plan, _, hu_case = _plan_and_cases(phantoms, tmp_path)
    image, geom = read_image(hu_case)
    odd = tmp_path / "cropped_0000.nii.gz"   # HU cropped to soft tissue: no air, not windowed, not HU + 1024
    img = sitk.GetImageFromArray(np.clip(image[0], 0, 200).astype(np.float32) + 0.5)
    img.SetSpacing(tuple(reversed(geom.spacing)))
    sitk.WriteImage(img, str(odd))
    capsys.readouterr()
    predict_case(Case("cropped", (odd,), None), plan, _threshold_predictor(len(plan.dataset.labels)))
    err = capsys.readouterr().err
    assert str(odd) in err and "no known unit" in err and "read as HU" in err
    # a file in HU says nothing
    predict_case(Case("fine", tuple(hu_case.image_files), None), plan, _threshold_predictor(len(plan.dataset.labels)))
    assert "warning" not in capsys.readouterr().err
