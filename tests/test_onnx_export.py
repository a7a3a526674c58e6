"""`segplan export --format onnx` (issue 26, item 2): per fold one ONNX network, checked by
onnxruntime against Keras on a patch and, through segplan's own tiling, against `segplan predict`
on a whole case."""
from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest

from segplan.planner.dataset import read_label
from segplan.runner.cli import main
from segplan.runner.workspace import Workspace

keras = pytest.importorskip("keras")
onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("tf2onnx")
pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                                 reason="ONNX export runs under the TensorFlow backend only (checked below)")]


@pytest.fixture(scope="module")
def exported(trained_cv, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    assert main(["export", str(trained_cv), "-o", str(out), "--format", "onnx"]) == 0
    return out


def test_one_network_per_fold_with_the_softmax_as_its_only_output(trained_cv, exported):
    plan = Workspace(trained_cv).plan
    assert sorted(p.name for p in exported.iterdir()) == ["fold_0.onnx", "fold_1.onnx"]  # no temporary left
    model = onnx.load(str(exported / "fold_0.onnx"))
    onnx.checker.check_model(model)

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
    assert [i.name for i in model.graph.input] == ["image"] and [o.name for o in model.graph.output] == ["softmax"]
    assert dims(model.graph.input[0]) == ["batch", "z", "y", "x", len(plan.dataset.channels)]
    assert dims(model.graph.output[0]) == ["batch", "z", "y", "x", len(plan.dataset.labels)]
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["segplan.fold"] == "0" and json.loads(meta["segplan.patch_size"]) == plan.training.patch_size


def test_onnxruntime_computes_what_keras_computes(trained_cv, exported):
    from segplan.runner.inference.models import load_fold_models
    plan, (model,) = load_fold_models(Workspace(trained_cv), [1])
    session = onnxruntime.InferenceSession(str(exported / "fold_1.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    # the training patch, and another size the pooling divides: the spatial size is free
    for shape in ([2, *plan.training.patch_size], [1, 16, 64, 48]):
        x = rng.normal(size=(*shape, len(plan.dataset.channels))).astype(np.float32)
        (y,) = session.run(None, {"image": x})
        expected = np.asarray(model.predict_on_batch(x))
        assert y.shape == expected.shape == (*shape, len(plan.dataset.labels))
        assert np.allclose(y.sum(-1), 1, atol=1e-5)  # the softmax, channels last
        np.testing.assert_allclose(y, expected, atol=1e-4, rtol=0)


def test_a_case_through_onnx_and_segplans_tiling_equals_segplan_predict(trained_cv, exported, tmp_path):
    from segplan.runner.inference.engines import onnxruntime_predictor as onnx_predictor
    from segplan.runner.inference.infer import keras_predictor
    from segplan.runner.inference.models import load_fold_models
    from segplan.runner.inference.case import predict_case
    ws = Workspace(trained_cv)
    case = ws.dataset.cases[0]
    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copy(case.image_files[0], inp / case.image_files[0].name)
    assert main(["predict", str(trained_cv), "-i", str(inp), "-o", str(tmp_path / "out"), "--folds", "0", "1",
                 "--no-postprocessing"]) == 0
    predicted = read_label(tmp_path / "out" / f"{case.case_id}.nii.gz")[0]
    plan, models = load_fold_models(ws, [0, 1])
    assert not plan.inference.mirroring  # the tiny plan: what predict did is exactly the tiling below
    labels, _, probs, *_ = predict_case(case, plan, onnx_predictor([exported / "fold_0.onnx", exported / "fold_1.onnx"]),
                                        probabilities=True)
    keras_probs = predict_case(case, plan, keras_predictor(models), probabilities=True).probabilities
    np.testing.assert_allclose(probs, keras_probs, atol=1e-4, rtol=0)
    assert labels.shape == predicted.shape
    # the label maps agree wherever the two networks' difference cannot reorder Keras' two best classes
    top2 = np.sort(keras_probs, axis=0)[-2:]
    decided = (top2[1] - top2[0]) > 2 * np.abs(probs - keras_probs).max()
    assert decided.mean() > 0.99
    assert np.array_equal(labels[decided], predicted[decided])


def test_missing_exporter_or_another_backend_is_refused_with_what_to_do(trained_cv, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tf2onnx", None)  # as if not installed
    assert main(["export", str(trained_cv), "-o", str(tmp_path / "o"), "--format", "onnx"]) == 2
    err = capsys.readouterr().err
    assert "needs tf2onnx" in err and "pip install 'segplan[onnx]'" in err
    assert not (tmp_path / "o").exists()
    monkeypatch.undo()
    monkeypatch.setattr("segplan.runner.backend.name", lambda: "jax")
    assert main(["export", str(trained_cv), "-o", str(tmp_path / "o"), "--format", "onnx"]) == 2
    assert "KERAS_BACKEND=tensorflow segplan export" in capsys.readouterr().err
