"""The cascade's runner side and prediction with a selection (issue 22), end to end on tiny plans:
a 3d_cascade_fullres plan refuses to train until its 3d_lowres plan's folds have finished, then
trains on their out-of-fold predictions as extra input channels and predicts both stages on the
original grid; an interrupted validation resumes; `segplan predict --selection` with an ensemble
is the argmax of the mean of its members' probabilities, and `segplan export --selection` bundles
it (the cascade's previous stage included) so that `segplan predict --model` predicts the same.
The 3d_lowres and cascade plans are a user's edits of a tiny 3d_fullres plan."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from segplan.planner.dataset import read_image, read_label
from segplan.planner.plan_file import load_plan, save_plan
from segplan.runner.cascade import corrupt, one_hot_foreground
from segplan.runner.cli import main
from segplan.runner.workspace import Workspace
from tests.tiny import first_case_input


def _cli(args) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, err.getvalue()


def _edit(source: Path, path: Path, name: str, configuration: str, **changes) -> Path:
    """The tiny plan at ``source`` as a plan of another configuration, beside it under ``path``."""
    plan = load_plan(source)
    plan = plan.replace(**{"name": name, "configuration": configuration,
                           "dataset": dataclasses.replace(plan.dataset, path=str(
                               (source.parent / plan.dataset.path).resolve()), work_dir=f"work/{name}"), **changes})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_plan(plan, path)
    return path


@pytest.fixture(scope="module")
def cascade(trained_cv, tmp_path_factory):
    """trained_cv's tiny 3d_fullres plan; a 3d_lowres edit of it (twice the spacing) and a cascade on
    it, the cascade refused first, then both trained (2 folds each)."""
    root = tmp_path_factory.mktemp("cascade")
    plan = load_plan(trained_cv)
    low = _edit(trained_cv, root / "plans" / "low.yaml", "low", "3d_lowres",
                resampling=dataclasses.replace(plan.resampling,
                                               target_spacing=[2 * s for s in plan.resampling.target_spacing]))
    cas = _edit(trained_cv, root / "plans" / "cas.yaml", "cas", "3d_cascade_fullres", previous_stage="low.yaml")
    rc, refused = _cli(["run", cas, "--fold", "0"])
    for k in (0, 1):
        assert main(["run", str(low), "--fold", str(k)]) == 0
    rc1, refused1 = _cli(["run", cas, "--fold", "all"])
    inp = root / "in"
    image = first_case_input(trained_cv, inp)
    return types.SimpleNamespace(root=root, full=trained_cv, low=low, cas=cas, inp=inp, image=image,
                                 refused=(rc, refused), trained=(rc1, refused1))


@pytest.mark.e2e
def test_a_cascade_refuses_until_its_lowres_folds_finish_then_trains_on_their_predictions(cascade):
    rc, err = cascade.refused
    assert rc == 2 and "needs every fold of" in err and str(cascade.low) in err
    assert f"segplan run {cascade.low} --fold 0" in err and f"segplan run {cascade.low} --fold 1" in err
    assert cascade.trained[0] == 0, cascade.trained[1]
    ws, low = Workspace(cascade.cas), Workspace(cascade.low)
    # the network reads the image and one channel per foreground class
    from segplan.runner.inference.models import load_fold_models
    plan, (model,) = load_fold_models(ws, [0])
    assert model.inputs[0].shape[-1] == 1 + len(plan.dataset.labels) - 1 == 4
    # each case's map is its out-of-fold low-resolution prediction on the cascade's preprocessed grid
    from segplan.runner.preprocessing.preprocess import label_to_grid, load_case
    held_out = {cid: k for k, s in enumerate(low.splits()) for cid in s["val"]}
    for case in ws.dataset.cases:
        data, _, props = load_case(ws.preprocessed, case.case_id)
        stored = np.load(ws.previous_stage_maps / f"{case.case_id}.npy")
        oof = read_label(low.fold(held_out[case.case_id]).validation_labels(case.case_id))[0]
        assert stored.shape == data.shape[1:] and np.array_equal(stored, label_to_grid(oof, props, ws.plan))
    # every validation case has its out-of-fold probabilities on its original grid
    for k, split in enumerate(ws.splits()):
        for cid in split["val"]:
            shape = read_image(next(c for c in ws.dataset.cases if c.case_id == cid))[0].shape[1:]
            with np.load(ws.fold(k).validation_probabilities(cid)) as z:
                p = z["probabilities"]
            assert p.dtype == np.float16 and p.shape == (4, *shape)
            assert np.allclose(p.astype(np.float32).sum(axis=0), 1, atol=2e-2)


@pytest.mark.e2e
def test_an_interrupted_validation_resumes_with_the_missing_cases_only(cascade):
    ws = Workspace(cascade.cas)
    fold = ws.fold(1)
    first, second = ws.splits()[1]["val"][:2]
    fold.validation_probabilities(first).unlink()      # as if killed before this case's probabilities
    before = fold.validation_probabilities(second).stat().st_mtime_ns
    fold.validation_summary.unlink()
    assert main(["run", str(cascade.cas), "--fold", "1"]) == 0
    assert fold.validation_probabilities(first).exists() and fold.validation_summary.exists()
    assert fold.validation_probabilities(second).stat().st_mtime_ns == before   # not predicted again


@pytest.mark.e2e
def test_a_cascade_predicts_both_stages_on_the_original_grid_and_its_bundle_holds_both(cascade):
    out = cascade.root / "pred_cascade"
    assert main(["predict", str(cascade.cas), "-i", str(cascade.inp), "-o", str(out), "--save-probabilities"]) == 0
    image, geom = read_image(next(c for c in Workspace(cascade.full).dataset.cases
                                  if c.image_files[0].resolve() == cascade.image))
    labels, g = read_label(out / f"{cascade.image.name.split('_0000')[0]}.nii.gz")
    assert labels.shape == image.shape[1:] and g.spacing == geom.spacing
    # its bundle carries the low-resolution stage, which predicts first
    bundle = cascade.root / "cas.zip"
    assert main(["export", str(cascade.cas), "-o", str(bundle)]) == 0
    manifest = json.loads(zipfile.ZipFile(bundle).read("manifest.json"))
    assert manifest["bundle_version"] == 2 and manifest["ensemble"] == ["3d_cascade_fullres"]
    assert [(m["name"], m["previous"]) for m in manifest["models"]] == [("3d_lowres", None),
                                                                       ("3d_cascade_fullres", "3d_lowres")]
    away = cascade.root / "plans_away"
    (cascade.root / "plans").rename(away)        # no plan, no work folder: the bundle alone
    try:
        out2 = cascade.root / "pred_cascade_bundle"
        assert main(["predict", "--model", str(bundle), "-i", str(cascade.inp), "-o", str(out2),
                     "--save-probabilities"]) == 0
    finally:
        away.rename(cascade.root / "plans")
    _same(out, out2)


def _same(a: Path, b: Path) -> None:
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for p in a.iterdir():
        if p.name.endswith(".nii.gz"):
            assert np.array_equal(read_label(p)[0], read_label(b / p.name)[0]), p.name
        elif p.suffix == ".csv":   # the quality check: the same scores, flags and reasons
            assert p.read_text() == (b / p.name).read_text(), p.name
        else:
            with np.load(p) as x, np.load(b / p.name) as y:
                assert np.array_equal(x["probabilities"], y["probabilities"]), p.name


def _probabilities(folder: Path) -> np.ndarray:
    with np.load(next(folder.glob("*.npz"))) as z:
        return z["probabilities"].astype(np.float32)


@contextlib.contextmanager
def _uncalibrated(*plans):
    """The plans' work folders without their calibration.yaml for the duration (put back after):
    saved probabilities are then the network's own, whose arg-max is the label map."""
    moved = []
    try:
        for plan in plans:
            path = Workspace(plan).calibration
            if path.exists():
                path.rename(path.with_suffix(".aside"))
                moved.append(path)
        yield
    finally:
        for path in moved:
            path.with_suffix(".aside").rename(path)


@pytest.mark.e2e
def test_predict_and_export_with_a_selection_that_is_an_ensemble(cascade):
    sel_path = cascade.root / "selection.yaml"
    assert main(["select", str(cascade.full), str(cascade.low), str(cascade.cas), "-o", str(sel_path)]) == 0
    sel = yaml.safe_load(sel_path.read_text())
    names = [c["name"] for c in sel["ranking"]]
    assert sorted(names) == sorted(["3d_fullres", "3d_lowres", "3d_cascade_fullres", "3d_fullres+3d_lowres",
                                    "3d_fullres+3d_cascade_fullres", "3d_lowres+3d_cascade_fullres"])
    # pick the ensemble of a full-resolution plan and the cascade, as a user may (the decided
    # postprocessing kept for it, as the file allows by naming it)
    sel["winner"] = sel["postprocessing_for"] = "3d_fullres+3d_cascade_fullres"
    sel_path.write_text(yaml.safe_dump(sel, sort_keys=False))
    flags = ["--no-postprocessing", "--save-probabilities"]
    outs = {}
    with _uncalibrated(cascade.full, cascade.low, cascade.cas):   # the averaging itself (calibration: test_trust)
        for key, args in (("full", [cascade.full]), ("cas", [cascade.cas]), ("ens", ["--selection", sel_path])):
            outs[key] = cascade.root / f"sel_{key}"
            assert main(["predict", *map(str, args), "-i", str(cascade.inp), "-o", str(outs[key]), *flags]) == 0
    mean = (_probabilities(outs["full"]) + _probabilities(outs["cas"])) / 2   # each on the original grid
    ens = _probabilities(outs["ens"])
    # float16 files: each value within half a float16 step (2.4e-4 below 1) of what was computed
    assert ens.shape == mean.shape and np.abs(ens - mean).max() < 5e-4
    labels = read_label(next(outs["ens"].glob("*.nii.gz")))[0]
    top2 = np.sort(mean, axis=0)[-2:]
    clear = top2[1] - top2[0] > 5e-4                # where that rounding cannot flip the argmax
    values = np.array([0, 1, 2, 3])
    assert clear.mean() > 0.5 and np.array_equal(labels[clear], values[np.argmax(mean, axis=0)][clear])
    members = [read_label(next(outs[k].glob("*.nii.gz")))[0] for k in ("full", "cas")]
    assert all(not np.array_equal(labels, m) for m in members)   # the average is neither member's
    # the bundle of the selection predicts what the selection predicts, postprocessing included
    bundle = cascade.root / "sel.zip"
    assert main(["export", "--selection", str(sel_path), "-o", str(bundle)]) == 0
    manifest = json.loads(zipfile.ZipFile(bundle).read("manifest.json"))
    assert manifest["ensemble"] == ["3d_fullres", "3d_cascade_fullres"] and manifest["selection"] == sel["winner"]
    assert {m["name"] for m in manifest["models"]} == {"3d_fullres", "3d_lowres", "3d_cascade_fullres"}
    a, b = cascade.root / "sel_pp", cascade.root / "sel_pp_bundle"
    assert main(["predict", "--selection", str(sel_path), "-i", str(cascade.inp), "-o", str(a)]) == 0
    assert main(["predict", "--model", str(bundle), "-i", str(cascade.inp), "-o", str(b)]) == 0
    _same(a, b)
    rc, err = _cli(["export", str(cascade.full), "--selection", sel_path, "-o", cascade.root / "x.zip"])
    assert rc == 2 and "one of the two" in err
    rc, err = _cli(["predict", str(cascade.full), "--selection", sel_path, "-i", cascade.inp, "-o", cascade.root / "x"])
    assert rc == 2 and "one of them" in err


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2 ** 32 - 1), classes=st.integers(2, 4), shape=st.tuples(
    st.integers(1, 6), st.integers(2, 12), st.integers(2, 12)))
def test_the_previous_stage_channels_stay_one_hot_and_binary_under_augmentation(seed, classes, shape):
    """nnU-Net's corruptions of the previous stage's channels (dilate, erode, open, close, drop a
    component) never make a voxel two classes, never make a value other than 0 or 1, and are a pure
    function of the generator."""
    rng = np.random.default_rng(seed)
    maps = rng.integers(0, classes, size=(3, *shape))
    onehot = one_hot_foreground(maps, classes, axis=1)
    a = corrupt(onehot, np.random.default_rng(seed))
    b = corrupt(onehot, np.random.default_rng(seed))
    assert np.array_equal(a, b) and a.shape == onehot.shape
    assert set(np.unique(a)) <= {0.0, 1.0} and a.sum(axis=1).max() <= 1
    assert np.array_equal(onehot, one_hot_foreground(maps, classes, axis=1))   # the input is left alone


def _ensemble_zip(path: Path, change=None) -> Path:
    """A version-2 bundle made by hand (placeholder files; what open_bundle checks is the manifest and
    the hashes): 3d_lowres -> cascade, averaged with 3d_fullres; ``change`` edits the manifest."""
    import hashlib
    files = {f"models/{m}/folds/{k}/{part}": f"{m}{k}{part}".encode() for m in ("full", "low", "cas")
             for k in (0, 1) for part in ("plan.yaml", "model.weights.h5")}
    manifest = {"bundle_version": 2, "models": [{"name": "full", "folds": [0, 1], "previous": None},
                                                {"name": "low", "folds": [0, 1], "previous": None},
                                                {"name": "cas", "folds": [0, 1], "previous": "low"}],
                "ensemble": ["full", "cas"], "files": {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}}
    if change is not None:
        change(manifest)
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("manifest.json", json.dumps(manifest))
    return path


ENSEMBLE_MANIFESTS = {  # edit -> what the refusal says
    "no models": (lambda m: m.pop("models"), "models must be a non-empty list"),
    "model without name": (lambda m: m["models"][0].pop("name"), "models[0].name must be a plain name"),
    "name with a slash": (lambda m: m["models"][0].update(name="a/b"), "models[0].name must be a plain name"),
    "name twice": (lambda m: m["models"][1].update(name="full"), "models lists full twice"),
    "bad folds": (lambda m: m["models"][2].update(folds=[1, 1]), "models[2].folds [1, 1] list fold 1 more than once"),
    "unknown key": (lambda m: m["models"][0].update(weights="x"), "models[0] has unknown keys ['weights']"),
    "unknown previous": (lambda m: m["models"][2].update(previous="mid"), "model cas's previous must be another"),
    "loop": (lambda m: m["models"][1].update(previous="cas"), "previous stages loop back"),
    "ensemble of nothing": (lambda m: m.update(ensemble=[]), "ensemble must be a non-empty list of distinct"),
    "ensemble twice": (lambda m: m.update(ensemble=["full", "full"]), "ensemble must be a non-empty list of distinct"),
    "ensemble unknown": (lambda m: m.update(ensemble=["full", "other"]), "ensemble must be a non-empty list"),
    "unused model": (lambda m: m.update(ensemble=["full"]), "models lists cas, low, which neither the ensemble"),
    "fold file missing": (lambda m: m["files"].pop("models/low/folds/1/model.weights.h5"),
                          "model low's fold 1 has no model.weights.h5"),
    "version 3": (lambda m: m.update(bundle_version=3), "bundle version 3 is unknown; this segplan reads versions 1 and 2"),
}


@pytest.mark.parametrize("case", list(ENSEMBLE_MANIFESTS))
def test_an_ensemble_bundle_manifest_is_checked_by_name_before_anything_is_unpacked(tmp_path, case):
    from segplan.planner.bundle_file import BundleError, bundle_models, open_bundle
    good = open_bundle(_ensemble_zip(tmp_path / "good.zip"), tmp_path / "good")
    models, ensemble = bundle_models(good)
    assert ensemble == ["full", "cas"] and models["cas"]["prefix"] == "models/cas/" and models["cas"]["previous"] == "low"
    edit, message = ENSEMBLE_MANIFESTS[case]
    bad = _ensemble_zip(tmp_path / "bad.zip", edit)
    with pytest.raises(BundleError) as e:
        open_bundle(bad, tmp_path / "into")
    assert message in str(e.value) and str(bad) in str(e.value)
    assert not (tmp_path / "into").exists()
