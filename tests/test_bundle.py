"""A model bundle (issue 13): exported from the work folder, it predicts on a machine with neither
the dataset nor the work folder exactly what the work folder predicts; a changed file, a missing
fold, an unknown version, an unfinished fold or the wrong channel count is refused by name."""
from __future__ import annotations

import json
import shutil
import zipfile

import numpy as np
import pytest
import SimpleITK as sitk

from planner.dataset import read_label
from runner.cli import main
from runner.workspace import Workspace
from tests.tiny import tiny_plan


def _rezip(src, dst, change: dict):
    """Copy a zip, replacing (bytes) or dropping (None) the named members."""
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(dst, "w") as b:
        for name in a.namelist():
            if name in change:
                if change[name] is not None:
                    b.writestr(name, change[name])
            else:
                b.writestr(name, a.read(name))


@pytest.mark.e2e
def test_bundle_predicts_like_the_work_folder_and_refuses_what_it_cannot_trust(phantoms, tmp_path):
    plan_path = tiny_plan(phantoms, tmp_path / "plans" / "p.yaml", epochs=1, iterations=2)
    assert main(["run", str(plan_path), "--fold", "0"]) == 0
    with pytest.raises(ValueError, match=r"folds \[1\] have not finished"):
        from runner.bundle import export
        export(plan_path, tmp_path / "m.zip")
    assert main(["run", str(plan_path), "--fold", "1"]) == 0
    assert main(["summarize", str(plan_path)]) == 0
    bundle = tmp_path / "m.zip"
    assert main(["export", str(plan_path), "-o", str(bundle)]) == 0
    names = zipfile.ZipFile(bundle).namelist()
    assert {"manifest.json", "folds/0/plan.yaml", "folds/1/model.weights.h5", "postprocessing.yaml"} <= set(names)
    # no training case ids: the training cases' units mean nothing to new images (issue 19)
    import yaml
    training_ids = {c.case_id for c in Workspace(plan_path).dataset.cases}
    for k in (0, 1):
        text = zipfile.ZipFile(bundle).read(f"folds/{k}/plan.yaml").decode()
        assert yaml.safe_load(text)["intensity"]["conventions"] == {}
        assert not [cid for cid in training_ids if cid in text]
    # input cases on "another machine": no dataset, no work folder
    case = Workspace(plan_path).dataset.cases[0]
    image = case.image_files[0].resolve()
    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copy(image, inp / image.name)
    assert main(["predict", str(plan_path), "-i", str(inp), "-o", str(tmp_path / "from_work")]) == 0
    # the network alone, for serving stacks: the SavedModel computes what Keras computes
    assert main(["export", str(plan_path), "-o", str(tmp_path / "served"), "--format", "savedmodel",
                 "--folds", "0"]) == 0
    import tensorflow as tf
    from runner.predict import load_fold_models
    _, (model,) = load_fold_models(Workspace(plan_path), [0])
    x = np.random.default_rng(0).normal(size=(1, 8, 32, 32, 1)).astype(np.float32)
    served = tf.saved_model.load(str(tmp_path / "served" / "fold_0"))
    assert np.allclose(np.asarray(served.serve(x)), model.predict_on_batch(x), atol=1e-5)
    shutil.rmtree(tmp_path / "plans")                       # the work folder and plan are gone
    assert main(["predict", "--model", str(bundle), "-i", str(inp), "-o", str(tmp_path / "from_bundle")]) == 0
    a = read_label(tmp_path / "from_work" / f"{case.case_id}.nii.gz")[0]
    b = read_label(tmp_path / "from_bundle" / f"{case.case_id}.nii.gz")[0]
    assert np.array_equal(a, b)
    # refused: a changed file, a missing fold file, an unknown version, the wrong channel count
    from runner.bundle import BundleError, open_bundle
    plan_text = zipfile.ZipFile(bundle).read("folds/0/plan.yaml").replace(b"overlap: 0.5", b"overlap: 0.25")
    manifest = json.loads(zipfile.ZipFile(bundle).read("manifest.json"))
    cases = [({"folds/0/plan.yaml": plan_text}, "folds/0/plan.yaml was changed after export"),
             ({"folds/1/model.weights.h5": None}, "folds/1/model.weights.h5 is listed in the manifest but missing"),
             ({"manifest.json": json.dumps({**manifest, "bundle_version": 99})}, "bundle version 99 is unknown")]
    for i, (change, message) in enumerate(cases):
        bad = tmp_path / f"bad{i}.zip"
        _rezip(bundle, bad, change)
        with pytest.raises(BundleError, match=message):
            open_bundle(bad, tmp_path / f"x{i}")
        assert main(["predict", "--model", str(bad), "-i", str(inp), "-o", str(tmp_path / f"o{i}")]) == 2
    two = tmp_path / "two"
    two.mkdir()
    img = sitk.ReadImage(str(image))
    sitk.WriteImage(img, str(two / "x_0000.nii.gz"))
    sitk.WriteImage(img, str(two / "x_0001.nii.gz"))
    assert main(["predict", "--model", str(bundle), "-i", str(two), "-o", str(tmp_path / "o2")]) == 2
