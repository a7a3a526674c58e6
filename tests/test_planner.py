import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from segplan.planner import heuristics as H
from segplan.planner.layouts import load_dataset
from segplan.planner.dataset import read_image
from segplan.planner.fingerprint import compute_fingerprint
from segplan.planner.intensity import detect_convention
from segplan.planner.plan import pool_divisor
from segplan.planner.plan_file import load_plan, save_plan
from segplan.planner.planning import plan_dataset
from segplan.planner.schema import SchemaError


def test_anisotropy_rule():
    iso = np.array([[1.0, 0.8, 0.8], [1.2, 0.7, 0.7], [1.1, 0.9, 0.9]])
    assert H.target_spacing(iso, {}) == [1.1, 0.8, 0.8]
    aniso = np.array([[5.0, 0.7, 0.7], [5.0, 0.8, 0.8], [3.0, 0.7, 0.7], [5.0, 0.9, 0.9], [4.0, 0.8, 0.8]])
    reasons = {}
    sp = H.target_spacing(aniso, reasons)
    assert sp[0] == pytest.approx(np.percentile(aniso[:, 0], 10)) and sp[0] < 5.0
    assert "anisotropic" in reasons["resampling.target_spacing"]


def test_topology_pools_and_kernels():
    pools, kernels = H.topology([40, 56, 40], [1.0, 1.0, 1.0])
    assert all(p == [2, 2, 2] for p in pools[:3]) and len(pools) <= H.MAX_POOLS
    # the coarse axis is not pooled until the others catch up, and gets 1-voxel kernels
    pools, kernels = H.topology([20, 160, 160], [5.0, 0.8, 0.8])
    assert pools[0] == [1, 2, 2] and kernels[0] == [1, 3, 3]
    size = np.array([20, 160, 160])
    for p in pools:
        size = size // np.array(p)
        assert size.min() >= 4


@pytest.mark.parametrize("median", [[36, 50, 35], [104, 254, 267], [17, 126, 126], [64, 64, 64]])
def test_patch_is_divisible_and_bounded(median):
    spacing = [1.0, 1.0, 1.0] if median[0] != 17 else [5.0, 1.0, 1.0]
    fit = H.fit_patch_and_batch(median, spacing, 8.0, 1, 3, 1e9, {})
    div = [np.prod([p[a] for p in fit["pools"]]) for a in range(3)]
    assert all(p % d == 0 for p, d in zip(fit["patch"], div))
    assert all(p <= int(np.ceil(m / d) * d) for p, m, d in zip(fit["patch"], median, div))
    assert fit["batch"] >= 2


def test_larger_budget_never_gives_smaller_patch_or_batch():
    median, sp = [104, 254, 267], [2.7, 1.58, 1.58]
    prev = None
    for gb in (2, 4, 6, 8, 11, 16, 24, 40, 80):
        fit = H.fit_patch_and_batch(median, sp, gb, 1, 4, 20 * np.prod(median), {})
        vol = np.prod(fit["patch"])
        if prev:
            assert vol >= prev[0] and (vol > prev[0] or fit["batch"] >= prev[1]), gb
        prev = (vol, fit["batch"])


@pytest.fixture(scope="module")
def phantom_plan(phantoms, tmp_path_factory):
    out = tmp_path_factory.mktemp("plans") / "ph.yaml"
    plan_dataset(phantoms, out, gpu_memory=8, workers=2, progress=False)
    return out


def test_save_load_round_trip_plain_types(phantom_plan, tmp_path):
    plan = load_plan(phantom_plan)
    copy = tmp_path / "copy.yaml"
    (tmp_path / "ds").symlink_to(Path(phantom_plan.parent / plan.dataset.path).resolve())
    plan2 = plan.replace(dataset=plan.dataset.__class__(**{**plan.dataset.__dict__, "path": "ds"}))
    save_plan(plan2, copy)
    assert load_plan(copy) == plan2

    def plain(x):
        if isinstance(x, dict):
            return all(isinstance(k, (str, int)) and plain(v) for k, v in x.items())
        if isinstance(x, list):
            return all(plain(v) for v in x)
        return x is None or type(x) in (int, float, str, bool)
    assert plain(yaml.safe_load(copy.read_text()))
    assert "# " in copy.read_text()  # commented for people


def _edit(path: Path, tmp_path: Path, old: str, new: str) -> Path:
    text = path.read_text()
    assert old in text, old
    out = tmp_path / path.name
    out.write_text(text.replace(old, new, 1))
    return out


@pytest.mark.parametrize("old,new,key,words", [
    ("  batch_size: 2\n  # the optimizer", "  bach_size: 2\n  # the optimizer", "training.bach_size", "did you mean 'batch_size'"),
    ("learning_rate: 0.001", "learning_rate: fast", "training.learning_rate", "expected a number"),
    ("  batch_size: 2\n  # the optimizer", "  batch_size: 0\n  # the optimizer", "training.batch_size", "must be >= 1"),
    ("mirror_p: 0.15", "mirror_p: 1.5", "training.augmentation.mirror_p", "within [0, 1]"),
    ("weighting: gaussian", "weighting: gausian", "inference.weighting", "did you mean 'gaussian'"),
    ("preset: default", "preset: nnunet-fancy", "preset", "unknown preset"),
    ("schema_version: 1", "schema_version: 7", "schema_version", "version 7 is unknown"),
    ("target_spacing: [", "target_spacing: [-1.0, ", "resampling.target_spacing.0", "must be > 0"),
    ("measured_gb: null", "measured_gb: -1", "memory.measured_gb", "must be > 0 or null"),
    ("learning_rate: 0.001", "learning_rate: .nan", "training.learning_rate", "must be a finite number"),
    ("  std: ", "  std: .inf #", "intensity.normalization.0.std", "must be a finite number"),
    ("  seed: 12345", "  seed: -1", "training.seed", "must be within 0..4294967295"),
])
def test_validation_errors_name_key_and_line(phantom_plan, tmp_path, old, new, key, words):
    edited = _edit(phantom_plan, tmp_path, old, new)
    with pytest.raises(SchemaError) as e:
        load_plan(edited, check_paths=False)
    msg = str(e.value)
    assert key in msg and words in msg, msg
    line = next(i + 1 for i, l in enumerate(edited.read_text().splitlines()) if new.split("\n")[0].strip() in l)
    assert f"{edited}:{line}:" in msg


def test_patch_not_divisible_and_missing_dataset(phantom_plan, tmp_path):
    plan = load_plan(phantom_plan)
    p = plan.training.patch_size
    edited = _edit(phantom_plan, tmp_path, f"patch_size: [{p[0]}, {p[1]}, {p[2]}]", f"patch_size: [{p[0]}, {p[1] + 1}, {p[2]}]")
    with pytest.raises(SchemaError) as e:
        load_plan(edited, check_paths=False)
    assert "training.patch_size.1" in str(e.value) and "not divisible" in str(e.value)
    (tmp_path / "sub").mkdir()
    moved = _edit(edited, tmp_path / "sub", "path: ", "path: nowhere/")
    with pytest.raises(SchemaError) as e:
        load_plan(moved)
    assert "dataset.path" in str(e.value) and "does not exist" in str(e.value)


def test_plan_refuses_to_overwrite(phantom_plan, phantoms):
    with pytest.raises(FileExistsError):
        plan_dataset(phantoms, phantom_plan, progress=False)


def test_check_warns_when_estimate_exceeds_budget(phantom_plan):
    from segplan.planner.planning import check_plan_report
    report = check_plan_report(phantom_plan)
    assert "estimated training memory" in report and "WARNING" not in report
    tight = phantom_plan.with_name("tight.yaml")
    tight.write_text(phantom_plan.read_text().replace("gpu_memory_gb: 8.0", "gpu_memory_gb: 0.5"))
    assert "WARNING: the estimate exceeds the budget" in check_plan_report(tight)


def test_test_time_mirroring_only_where_training_mirrors_most_patches(phantom_plan):
    """The default plan trains with the paper's augmentation (mirror_p 0.15): it predicts without
    test-time mirroring, and says why; `segplan check` warns when an edit turns mirroring on without
    training that mirrors at least half the patches, and not once it does."""
    from segplan.planner.planning import check_plan_report
    plan = load_plan(phantom_plan)
    assert plan.training.augmentation.mirror_p == 0.15 and plan.inference.mirroring is False
    text = phantom_plan.read_text()
    assert "only where training mirrors at least half the patches" in text
    on = phantom_plan.with_name("mirror_on.yaml")  # beside it: the dataset path is relative
    on.write_text(text.replace("mirroring: false", "mirroring: true"))
    assert "WARNING: inference.mirroring averages flipped views" in check_plan_report(on)
    assert "mirror_p 0.15" in check_plan_report(on)
    trained = phantom_plan.with_name("mirror_trained.yaml")
    trained.write_text(on.read_text().replace("mirror_p: 0.15", "mirror_p: 1.0"))
    assert "WARNING" not in check_plan_report(trained)
    assert "WARNING" not in check_plan_report(phantom_plan)


def test_left_right_axis_from_direction_cosines():
    """The array axis along the patient's left-right direction, whatever the orientation or sign."""
    from segplan.planner.dataset import left_right_axis
    assert left_right_axis([1, 0, 0, 0, 1, 0, 0, 0, 1]) == 2            # axial, identity: x
    assert left_right_axis([-1, 0, 0, 0, -1, 0, 0, 0, 1]) == 2          # flipped (ct_example, Hippocampus)
    assert left_right_axis([0, 0, 1, 1, 0, 0, 0, 1, 0]) == 0            # index axis z runs along world x (sagittal)
    assert left_right_axis([0, 0.98, 0.2, 0, -0.2, 0.98, 1, 0, 0]) == 1  # oblique: y mostly left-right


def test_no_mirroring_along_the_left_right_axis_when_labels_name_sides(phantom_plan, phantoms, tmp_path):
    """Phantoms label left and right lungs: flipping the left-right axis (x here) would teach the
    network a left lung where the right one is, so the plan mirrors z and y only and says why; a 2d
    plan slicing along z keeps y. The paper's preset keeps the paper's three axes."""
    plan = load_plan(phantom_plan)
    assert plan.training.augmentation.mirror_axes == [0, 1]
    assert "the labels name sides (left_lung, right_lung)" in phantom_plan.read_text()
    two_d = load_plan(plan_dataset(phantoms, tmp_path / "2d.yaml", gpu_memory=8, progress=False, configuration="2d"))
    assert two_d.slice_axis == 0 and two_d.training.augmentation.mirror_axes == [0]
    paper = load_plan(plan_dataset(phantoms, tmp_path / "paper.yaml", gpu_memory=8, progress=False,
                                   preset="miscnn-covid19"))
    assert paper.training.augmentation.mirror_axes == [0, 1, 2]


def test_hu_and_windowed_detection(phantoms, ct_example):
    import json
    truth = {i["case"]: i["windowed"] for i in json.loads((phantoms / "phantoms.json").read_text())}
    ds = load_dataset(phantoms)
    fp = compute_fingerprint(ds, progress=False)
    for c in fp.cases:
        assert c.conventions == ["windowed" if truth[c.case_id] else "hu"]
    ct = load_dataset(ct_example)
    assert detect_convention(read_image(ct.cases[0])[0][0], True) == "hu"
    # statistics are pooled in HU: the lung/infection foreground median is far below soft tissue
    assert fp.channels[0].is_ct and fp.channels[0].p50 < -500
    assert fp.class_presence == [8, 8, 8, 8]


def test_planner_on_hippocampus(hippocampus, tmp_path, monkeypatch):
    out = plan_dataset(hippocampus, tmp_path / "hippo.yaml", gpu_memory=8, workers=2, progress=False)
    plan = load_plan(out)
    assert plan.resampling.target_spacing == [1.0, 1.0, 1.0]
    from segplan.planner.planning import fingerprint_cache
    fp_cases = yaml.safe_load(fingerprint_cache(hippocampus, tmp_path).read_text())["cases"]
    median = np.median([c["cropped_shape"] for c in fp_cases], axis=0)
    div = pool_divisor(plan.network)
    for p, m, d in zip(plan.training.patch_size, median, div):
        assert p <= int(np.ceil(m / d) * d)
    assert plan.intensity.normalization[0].scheme == "zscore" and plan.dataset.splits_file.endswith("splits_final.json")
    assert plan.training.augmentation.mirror_axes == [0, 1, 2]  # no left/right labels: every axis
    # re-planning, under another name too, reuses the dataset's cached fingerprint: reading any
    # image would fail here
    def no_reading(*a, **k):
        raise AssertionError("the fingerprint was recomputed instead of taken from the cache")
    monkeypatch.setattr("segplan.planner.fingerprint.compute_fingerprint", no_reading)
    monkeypatch.setattr("segplan.planner.dataset.read_volume", no_reading)
    monkeypatch.setattr("segplan.planner.fingerprint.read_volume", no_reading)
    plan_dataset(hippocampus, tmp_path / "hippo.yaml", gpu_memory=4, force=True, progress=False)
    plan_dataset(hippocampus, tmp_path / "other_name.yaml", gpu_memory=6, progress=False)
    assert load_plan(tmp_path / "hippo.yaml").memory.gpu_memory_gb == 4
    assert load_plan(tmp_path / "other_name.yaml").memory.gpu_memory_gb == 6


def test_miscnn_preset_reproduces_the_paper(phantoms, tmp_path):
    out = plan_dataset(phantoms, tmp_path / "covid.yaml", preset="miscnn-covid19", progress=False)
    p = load_plan(out)
    assert p.resampling.target_spacing == [2.70, 1.58, 1.58] and p.training.patch_size == [80, 160, 160]
    assert p.training.batch_size == 2 and p.network.filters == [32, 64, 128, 256, 512]
    n = p.intensity.normalization[0]
    assert (n.scheme, n.clip, n.zscore) == ("ct", [-1250.0, 250.0], "case")
    s = p.training.schedule
    assert (s.plateau_factor, s.plateau_patience, s.min_learning_rate, s.early_stopping_patience, s.max_epochs,
            s.iterations_per_epoch, s.monitor) == (0.1, 15, 1e-5, 100, 1000, 150, "train_loss")
    aug = p.training.augmentation
    assert all(getattr(aug, f) == 0.15 for f in vars(aug) if f.endswith("_p"))
    assert (p.inference.overlap, p.inference.weighting, p.cross_validation.folds) == (0.5, "constant", 5)
    assert p.dataset.label_groups == {"lungs": ["left_lung", "right_lung"]}
    assert (p.training.loss.tversky_alpha, p.training.loss.tversky_beta) == (0.5, 0.5)


def test_choose_width_buys_enough_iterations():
    from segplan.planner.cpu_plan import MIN_ITERATIONS, USABLE_SHARE, choose_width
    seconds = [0.1, 0.3, 0.9]
    budget = 900.0
    pick = choose_width(seconds, budget)
    assert budget * USABLE_SHARE / seconds[pick] >= MIN_ITERATIONS
    assert all(budget * USABLE_SHARE / s < MIN_ITERATIONS for s in seconds[pick + 1:])
    assert choose_width(seconds, 10.0) == 0  # nothing is fast enough: the fastest


def test_choose_width_weighs_what_a_case_costs_to_predict():
    """The widest network that trains enough is not chosen when predicting a median case with it
    would take longer than MAX_CASE_SECONDS on this machine (a big CT at fine spacing)."""
    from segplan.planner.cpu_plan import MAX_CASE_SECONDS, choose_width
    seconds, budget = [0.1, 0.2, 0.3], 3600.0
    assert choose_width(seconds, budget) == 2
    assert choose_width(seconds, budget, [30.0, 90.0, 3 * MAX_CASE_SECONDS]) == 1
    assert choose_width(seconds, budget, [2 * MAX_CASE_SECONDS] * 3) == 0


def test_cpu_plan_with_probe_and_no_tensorflow_in_the_planner(phantoms, tmp_path):
    """No device, preset or budget and no GPU: a CPU plan, its width chosen by the probe, which runs
    in a child process: the planner process itself never imports TensorFlow."""
    code = ("import sys; from segplan.planner.planning import plan_dataset; "
            f"plan_dataset(__import__('pathlib').Path({str(phantoms)!r}), __import__('pathlib').Path({str(tmp_path / 'p.yaml')!r}), progress=False, time_budget=2); "
            "from segplan.planner.planning import check_plan_report; check_plan_report(__import__('pathlib').Path("
            f"{str(tmp_path / 'p.yaml')!r})); "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')]; assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert r.returncode == 0, r.stderr[-2000:]
    text = (tmp_path / "p.yaml").read_text()
    plan = load_plan(tmp_path / "p.yaml")
    assert plan.device == "cpu" and plan.training.schedule.time_budget_minutes == 2
    from segplan.planner.build import gpu_present
    assert "probe on this machine" in text and "s/step" in text and "s per median case" in text
    assert "windows of" in text and "s per window" in text   # what a case costs to predict, in the plan
    assert gpu_present() or "no GPU found" in text
    assert plan.network.filters[0] in (8, 16, 32) and plan.training.schedule.iterations_per_epoch >= 10


def test_prediction_warns_when_an_old_plan_mirrors_at_test_time_what_training_rarely_did(phantom_plan, capsys):
    """A plan or bundle written before the rule (inference.mirroring: true with mirror_p 0.15) is
    predicted as written, but `segplan run/predict` say on stderr what `segplan check` says; not
    when training mirrored at least half the patches, nor when mirroring is off or --no-tta."""
    import dataclasses
    from segplan.runner.inference.stages import make_stage
    plan = load_plan(phantom_plan)
    old = plan.replace(inference=dataclasses.replace(plan.inference, mirroring=True))
    make_stage(old, [], tta=True)
    err = capsys.readouterr().err
    assert "segplan: warning:" in err and "mirror_p 0.15" in err and "--no-tta" in err
    trained = old.replace(training=dataclasses.replace(
        old.training, augmentation=dataclasses.replace(old.training.augmentation, mirror_p=1.0)))
    for quiet in (make_stage(trained, [], tta=True), make_stage(old, [], tta=False), make_stage(plan, [], tta=True)):
        assert quiet.plan is not None
    assert capsys.readouterr().err == ""
