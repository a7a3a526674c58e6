"""Inference engines (issue 40, point 2): ``inference.engine`` onnxruntime or openvino predicts the
labels Keras predicts (>= 99.9% of voxels, probabilities within 1e-3), the exported network is
made once per fold and kept in the work folder (remade for other weights), a missing package is
refused naming the extra, and the CPU planner's engine probe measures what is installed."""
from __future__ import annotations

import dataclasses
import importlib.util
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from segplan.planner.plan_file import load_plan, save_plan

keras = pytest.importorskip("keras")
pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                                 reason="the engines run the network exported to ONNX, written under TensorFlow only")]


@pytest.fixture(scope="module")
def copied(trained_cv, tmp_path_factory):
    """The trained tiny plan and its work folder copied (exports are written into the work folder)."""
    root = tmp_path_factory.mktemp("engines")
    plan = load_plan(trained_cv)
    shutil.copytree(trained_cv.parent / plan.dataset.work_dir, root / plan.dataset.work_dir)
    path = root / "cv.yaml"
    save_plan(plan.replace(dataset=dataclasses.replace(plan.dataset, path=str((trained_cv.parent / plan.dataset.path)
                                                                              .resolve()))), path)
    return path


def _with_engine(path, engine: str):
    plan = load_plan(path)
    save_plan(plan.replace(inference=dataclasses.replace(plan.inference, engine=engine)), path)
    return path


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_an_engine_predicts_what_keras_predicts_and_exports_once_per_fold(copied, engine):
    from segplan.runner.inference.predictor import Predictor
    from segplan.runner.workspace import Workspace
    ws = Workspace(copied)
    image = next(c for c in ws.dataset.cases).image_files[0]
    keras_labels, keras_probs = Predictor.from_plan(_with_engine(copied, "keras"), postprocessing=False).predict(
        image, probabilities=True)
    predictor = Predictor.from_plan(_with_engine(copied, engine), postprocessing=False)
    labels, probs = predictor.predict(image, probabilities=True)
    a, b = sitk.GetArrayFromImage(labels), sitk.GetArrayFromImage(keras_labels)
    assert len(np.unique(b)) > 2 and np.mean(a == b) >= 0.999
    np.testing.assert_allclose(probs, keras_probs, atol=1e-3)
    exported = {k: sorted((ws.fold(k).dir / "exported").glob("*.onnx")) for k in (0, 1)}
    assert all(len(v) == 1 for v in exported.values()), exported
    stamps = {k: v[0].stat().st_mtime_ns for k, v in exported.items()}
    Predictor.from_plan(copied, postprocessing=False)                       # kept: not exported again
    assert {k: sorted((ws.fold(k).dir / "exported").glob("*.onnx"))[0].stat().st_mtime_ns for k in (0, 1)} == stamps


def test_other_weights_get_another_export_and_a_missing_engine_names_the_extra(copied, tmp_path, monkeypatch):
    from segplan.runner.inference import engines
    from segplan.runner.inference.predictor import Predictor
    a, b = tmp_path / "a.weights.h5", tmp_path / "b.weights.h5"
    a.write_bytes(b"one")
    b.write_bytes(b"two")
    assert engines.exported_path(a).name.startswith("a-") and engines.exported_path(a) != engines.exported_path(b)
    assert engines.exported_path(a).parent == tmp_path / "exported"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *x: None if name == "openvino" else real(name, *x))
    with pytest.raises(engines.EngineMissing, match=r"inference.engine: openvino needs openvino, not installed: "
                                                     r"pip install 'segplan\[cpu\]'"):
        Predictor.from_plan(_with_engine(copied, "openvino"))
    assert engines.missing("onnxruntime", "jax").startswith("inference.engine: onnxruntime runs the network exported")
    _with_engine(copied, "keras")


def test_the_engine_probe_times_every_installed_engine_against_keras(phantoms, tmp_path):
    from segplan.planner.probing import run_engine_probe
    from segplan.planner.schema import to_plain
    from tests.tiny import tiny_plan
    plan = load_plan(tiny_plan(phantoms, tmp_path / "p.yaml"))
    found, why = run_engine_probe(to_plain(plan.network), plan.training.patch_size, 2, 1, 4, "softmax")
    assert found is not None, why
    assert set(found["seconds"]) == {"keras", "onnxruntime", "openvino"}   # the test extra installs both
    assert all(s > 0 for s in found["seconds"].values())
    assert all(d < 1e-3 for d in found["max_difference"].values()) and found["max_difference"]["keras"] == 0.0


def test_a_network_built_under_mixed_precision_is_exported_in_float32(phantoms, tmp_path):
    """A fold trained with mixed precision and validated in the same process builds its prediction
    network under the mixed policy; exported as it is, ONNX Runtime refused the bfloat16 graph and
    the cached file broke every later prediction. The export is float32 and computes what Keras does."""
    import onnxruntime
    from segplan.runner.inference.onnx_file import export_onnx
    from segplan.runner.training.model import plan_network, prediction_model
    from tests.tiny import tiny_plan
    plan = load_plan(tiny_plan(phantoms, tmp_path / "p.yaml"))
    reference = prediction_model(plan_network(plan))
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        mixed = prediction_model(plan_network(plan))
        mixed.set_weights(reference.get_weights())
        assert any(layer.compute_dtype == "bfloat16" for layer in mixed.layers)
        path = export_onnx(mixed, plan, 0, tmp_path / "exported" / "net.onnx")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert sorted(p.name for p in path.parent.iterdir()) == ["net.onnx"]     # no temporary left
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(1, *plan.training.patch_size, 1)).astype(np.float32)
    np.testing.assert_allclose(session.run(None, {"image": x})[0], reference.predict_on_batch(x), atol=1e-4)


def test_select_seconds_per_case_scores_and_times_every_setting_and_predict_and_export_use_the_winners(
        copied, tmp_path):
    """`segplan select --seconds-per-case` (issue 40, point 4): every engine x overlap x mirroring
    x folds candidate is timed; the one-fold ones are scored out of fold, and the plan's own
    settings score exactly what the fold's validation predictions score; more folds carry their
    one-fold counterpart's Dice as a lower bound; an impossible time is refused naming the fastest;
    predict and export --selection use the winner's settings."""
    import json
    import zipfile
    import yaml
    from segplan.planner.dataset import read_label
    from segplan.runner.cli import main
    from segplan.runner.evaluation.selection import load_selection
    from segplan.runner.inference.engines import installed
    from segplan.runner.inference.predictor import Predictor
    from segplan.runner.workspace import Workspace
    plan_path = _with_engine(copied, "keras")
    plan = load_plan(plan_path)
    out = tmp_path / "sel" / "selection.yaml"
    assert main(["select", str(plan_path), "--seconds-per-case", "1000", "--cases", "2", "--overlaps", "0.5", "0.25",
                 "-o", str(out)]) == 0
    sel = load_selection(out)
    from segplan.planner.planning import mirroring_prepared
    mirrors = 2 if mirroring_prepared(plan) else 1
    assert len(sel.ranking) == len(installed("tensorflow")) * 2 * mirrors * 2
    assert sel.seconds_per_case == 1000 and len(sel.sample) == 2 and sel.machine
    ws = Workspace(plan_path)
    held_out = {cid: k for k, s in enumerate(ws.splits()) for cid in s["val"]}
    assert sorted(held_out[c] for c in sel.sample) == [0, 1]              # one case of each fold
    by = {(c.settings.engine, c.settings.overlap, c.settings.mirroring, c.settings.folds): c for c in sel.ranking}
    assert all(c.seconds_per_case > 0 for c in sel.ranking)
    for (engine, overlap, mirroring, folds), c in by.items():
        assert c.dice_lower_bound == (folds == 2)
        if folds == 2:
            assert c.dice == by[(engine, overlap, mirroring, 1)].dice
    # the plan's own settings, one fold: the Dice of the fold's own validation label maps
    own = by[("keras", plan.inference.overlap, plan.inference.mirroring, 1)]
    files = {c.case_id: c.label_file for c in ws.dataset.cases}
    for name, value in plan.dataset.labels.items():
        if value == 0:
            continue
        dice = []
        for cid in sel.sample:
            pred = read_label(ws.fold(held_out[cid]).validation_labels(cid))[0] == value
            ref = read_label(files[cid])[0] == value
            dice.append(np.nan if not (pred.any() or ref.any()) else 2 * np.sum(pred & ref) / (pred.sum() + ref.sum()))
        expected = np.nanmean(dice) if not np.all(np.isnan(dice)) else None
        assert (own.dice[name] is None) == (expected is None)
        if expected is not None:
            assert own.dice[name] == pytest.approx(expected, abs=1e-6), name
    # the winner: the most accurate; nothing meets 1 microsecond, and the refusal names the fastest
    assert sel.winner == sel.ranking[0].name
    fastest = min(sel.ranking, key=lambda c: c.seconds_per_case)
    import contextlib
    import io
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["select", str(plan_path), "--seconds-per-case", "0.000001", "--cases", "1", "--overlaps", "0.25",
                     "-o", str(tmp_path / "none.yaml")]) != 0
    assert "no candidate predicts a case that fast" in err.getvalue() and "s per case" in err.getvalue()
    assert not (tmp_path / "none.yaml").exists()
    assert fastest.seconds_per_case > 0
    # pick another candidate by hand: predict and export --selection use its settings
    data = yaml.safe_load(out.read_text())
    pick = next(c for c in sel.ranking if c.settings.folds == 1 and c.settings.overlap == 0.25
                and c.settings.engine == "keras" and not c.settings.mirroring)
    text = out.read_text().replace(f"winner: {yaml.safe_dump(data['winner']).splitlines()[0]}",
                                   f"winner: {yaml.safe_dump(pick.name).splitlines()[0]}")
    text = text.replace(f"postprocessing_for: {yaml.safe_dump(data['postprocessing_for']).splitlines()[0]}",
                        f"postprocessing_for: {yaml.safe_dump(pick.name).splitlines()[0]}")
    out.write_text(text)
    assert load_selection(out).winner == pick.name
    predictor = Predictor.from_selection(out, postprocessing=False)
    assert predictor.plan.inference.overlap == 0.25 and predictor.plan.inference.engine == "keras"
    image = ws.dataset.cases[0].image_files[0]
    labels = sitk.GetArrayFromImage(predictor.predict(image))
    edited = tmp_path / "edited.yaml"
    save_plan(plan.replace(inference=dataclasses.replace(plan.inference, overlap=0.25)), edited)
    shutil.copytree(plan_path.parent / plan.dataset.work_dir, tmp_path / plan.dataset.work_dir)
    direct = Predictor.from_plan(edited, folds=[0], postprocessing=False)
    np.testing.assert_array_equal(labels, sitk.GetArrayFromImage(direct.predict(image)))
    bundle = tmp_path / "winner.zip"
    assert main(["export", "--selection", str(out), "-o", str(bundle)]) == 0
    with zipfile.ZipFile(bundle) as z:
        manifest = json.loads(z.read("manifest.json"))
        bundled = yaml.safe_load(z.read("folds/0/plan.yaml"))
    assert manifest["folds"] == [0] and bundled["inference"]["overlap"] == 0.25
