"""nnU-Net's configuration family, part A (issue 22): a 2d plan end to end (sampling, tiling, network
and loss written once for 2 or 3 spatial axes; a fold trains, resumes exactly, predicts on the
original 3D grid and travels in a bundle), a 3d_lowres plan likewise, and the planner's
--configuration / --configurations all: nnU-Net's coverage rule over made-up fingerprints, the
plans side by side from one fingerprint, and the cascade's previous_stage checked by key."""
from __future__ import annotations

import dataclasses
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from segplan.planner import heuristics as H
from segplan.planner.build import make_plan
from segplan.planner.configurations import LOWRES_COVERAGE, NotApplicable, plan_family, slice_axis
from segplan.planner.cpu_plan import make_cpu_plan
from segplan.planner.memory import activation_voxels, count_parameters, estimate_for_plan
from segplan.planner.plan import NetworkSection, input_channels, pool_divisor, volume_patch
from segplan.planner.plan_file import load_plan, save_plan
from segplan.planner.planning import check_plan_report, plan_configurations, plan_dataset
from segplan.planner.schema import SchemaError
from segplan.runner.inference.infer import on_windows, sliding_window
from tests.test_planner_properties import deadline, fingerprints
from tests.tiny import LOWRES_GPU_GB, first_case_input, tiny_plan

needs_keras = pytest.mark.skipif(importlib.util.find_spec("keras") is None, reason="keras is not installed")


# ------------------------------------------------------------------ 2D tiling and sampling (no Keras)

@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("weighting", ["constant", "gaussian"])
def test_a_2d_network_tiles_a_volume_slice_by_slice_in_batches(axis, weighting):
    """Every window the 2D predictor gets is a slice of the volume with its in-plane axes in (z, y, x)
    order; an element-wise predictor gives back its result on every voxel of the 3D grid."""
    vol = np.random.default_rng(axis).normal(size=(2, 7, 11, 13)).astype(np.float32)
    patch = [d - 3 for a, d in enumerate(vol.shape[1:]) if a != axis]   # a few windows per slice
    window = volume_patch(patch, axis)
    planes = np.moveaxis(vol, axis + 1, 1)                               # (c, slice, in-plane...)
    calls = []

    def net2d(batch):
        assert batch.ndim == 4 and batch.shape[2:] == tuple(patch)
        for item in batch:  # a crop of one slice, axes in (z, y, x) order
            views = np.lib.stride_tricks.sliding_window_view(planes, tuple(patch), axis=(2, 3))
            assert np.any(np.all(views == item[:, None, None, None], axis=(0, 4, 5)))
        calls.append(len(batch))
        return batch * 2.0 + 1.0
    out = sliding_window(vol, window, on_windows(net2d, patch, window), 2, 0.5, weighting, batch_size=4)
    assert out.shape == vol.shape and np.allclose(out, vol * 2 + 1, atol=1e-5)
    per_slice = math.prod(len(H.window_starts(n, p, 0.5)) for n, p in zip(planes.shape[2:], patch))
    assert max(calls) == 4 and sum(calls) == vol.shape[axis + 1] * per_slice > vol.shape[axis + 1]


def test_the_slice_axis_is_the_coarsest_axis_and_the_first_on_ties():
    assert slice_axis([5.0, 0.8, 0.8]) == 0 and slice_axis([1.0, 1.0, 3.0]) == 2 and slice_axis([1.0] * 3) == 0
    assert volume_patch([32, 48], 1) == [32, 1, 48] and volume_patch([8, 32, 32], None) == [8, 32, 32]


def test_the_memory_model_counts_a_2d_network_as_the_3d_one_a_voxel_deep():
    """A 2D U-Net on (y, x) patches holds what the 3D U-Net does on (1, y, x) patches whose kernels
    and pooling are 1 along z: the model counts both the same."""
    net2 = NetworkSection([8, 16, 32], [[2, 2], [2, 2]], [[3, 3]] * 3, 2, "batch", 0.99, "relu", "transpose",
                          deep_supervision=True)
    net3 = dataclasses.replace(net2, pool_sizes=[[1, 2, 2]] * 2, kernel_sizes=[[1, 3, 3]] * 3)
    assert activation_voxels(net2, [64, 48], 4) == activation_voxels(net3, [1, 64, 48], 4)
    assert count_parameters(net2, 2, 4) == count_parameters(net3, 2, 4)
    assert pool_divisor(net2) == [4, 4]


@pytest.fixture(scope="module")
def plan_2d(phantoms, tmp_path_factory) -> Path:
    return tiny_plan(phantoms, tmp_path_factory.mktemp("p2d") / "plans" / "p.yaml", configuration="2d")


def test_2d_patches_are_slices_and_augmented_as_2d_batches(plan_2d):
    from segplan.runner.training.data import PatchSampler, build_augmentation, make_batch
    from segplan.runner.preprocessing.preprocess import preprocess_dataset
    from segplan.runner.workspace import Workspace
    plan = load_plan(plan_2d)
    aug = dataclasses.replace(plan.training.augmentation,
                              **{f: 1.0 for f in vars(plan.training.augmentation) if f.endswith("_p")})
    plan = plan.replace(training=dataclasses.replace(plan.training, augmentation=aug))
    ws = Workspace(plan_2d, plan)
    pre = preprocess_dataset(ws, workers=1, progress=False)
    ids = [c.case_id for c in ws.dataset.cases]
    sampler = PatchSampler(pre, ids, plan.training.patch_size, 0.0, slice_axis=plan.slice_axis)
    x, y = sampler.sample(np.random.default_rng(0))
    assert x.shape == (1, 32, 32) and y.shape == (1, 32, 32)  # labels with their channel axis
    y = y[0]
    found = False
    for cid in ids:  # the patch is a crop of one slice of one case, image and labels alike
        data, seg, _ = sampler.cases[cid]
        views = np.lib.stride_tricks.sliding_window_view(np.asarray(data[0]), (32, 32), axis=(1, 2))
        hit = np.argwhere(np.all(views == x[0], axis=(-2, -1)))
        found = found or any(np.array_equal(seg[z, i:i + 32, j:j + 32], y) for z, i, j in hit)
    assert found
    transform = build_augmentation(plan.training.augmentation, plan.training.patch_size)
    a, b = make_batch(sampler, transform, plan, 0, 2, 1), make_batch(sampler, transform, plan, 0, 2, 1)
    plain = make_batch(sampler, None, plan, 0, 2, 1)
    assert a[0].shape == (2, 32, 32, 1) and a[1].shape == (2, 32, 32, 4) and np.allclose(a[1].sum(-1), 1)
    assert np.array_equal(a[0], b[0]) and not np.array_equal(a[0], plain[0])


# ------------------------------------------------------------------ plans: 2d, the family, the cascade

def test_a_2d_plan_slices_along_the_coarse_axis_and_edits_are_refused_by_key(phantoms, tmp_path):
    out = plan_dataset(phantoms, tmp_path / "p.yaml", gpu_memory=8, progress=False, configuration="2d")
    plan = load_plan(out)
    sp = plan.resampling.target_spacing
    assert plan.configuration == "2d" and plan.slice_axis == int(np.argmax(sp)) == 0
    assert len(plan.training.patch_size) == 2 and all(len(p) == 2 for p in plan.network.pool_sizes)
    # the slice's two axes (y, x), but x, the phantoms' left-right axis (left/right lung labels)
    assert plan.training.augmentation.mirror_axes == [0] and "valid plan" in check_plan_report(out)
    median = H.median_resampled_shape(load_fp(out), sp)[1:]
    div = pool_divisor(plan.network)
    assert all(p <= max(d, math.ceil(m / d) * d) for p, m, d in zip(plan.training.patch_size, median, div))
    assert "coarsest axis" in out.read_text()
    edits = {"slice_axis": (dict(slice_axis=None), r"slice_axis: None: a 2d plan slices along axis 0"),
             "patch": (dict(training=dataclasses.replace(plan.training, patch_size=[8, 32, 32])),
                       r"training.patch_size: expected 2 values"),
             "pools": (dict(network=dataclasses.replace(plan.network, pool_sizes=[[2, 2, 2]] * 4)),
                       r"network.pool_sizes.0: \[2, 2, 2\]: each entry is 2 values"),
             "mirror": (dict(training=dataclasses.replace(plan.training, augmentation=dataclasses.replace(
                 plan.training.augmentation, mirror_axes=[0, 1, 2]))), r"training.augmentation.mirror_axes.2"),
             "3d": (dict(configuration="3d_fullres"), r"slice_axis: only a 2d plan slices")}
    for name, (change, message) in edits.items():
        save_plan(plan.replace(**change), tmp_path / f"{name}.yaml")
        with pytest.raises(SchemaError, match=message):
            load_plan(tmp_path / f"{name}.yaml")


def load_fp(plan_path: Path):
    from segplan.planner.fingerprint import load_fingerprint
    return load_fingerprint(next(plan_path.parent.glob("*.fingerprint.yaml")))


def test_configurations_all_side_by_side_from_one_fingerprint_each_checked(phantoms, tmp_path, monkeypatch, capsys):
    import segplan.planner.fingerprint as F
    from segplan.runner.cli import main
    computed = []
    real = F.compute_fingerprint
    monkeypatch.setattr(F, "compute_fingerprint", lambda *a, **k: computed.append(1) or real(*a, **k))
    plans = tmp_path / "plans"
    assert main(["plan", str(phantoms), "-o", str(plans / "ph.yaml"), "--configurations", "all",
                 "--gpu-memory", str(LOWRES_GPU_GB)]) == 0
    names = sorted(p.name for p in plans.glob("ph*.yaml"))
    assert names == ["ph_2d.yaml", "ph_3d_cascade_fullres.yaml", "ph_3d_fullres.yaml", "ph_3d_lowres.yaml"]
    assert len(computed) == 1 and len(list(plans.glob("*.fingerprint.yaml"))) == 1
    for name in names:
        assert main(["check", str(plans / name)]) == 0
    full, low, cascade = (load_plan(plans / f"ph_{c}.yaml") for c in ("3d_fullres", "3d_lowres", "3d_cascade_fullres"))
    assert [p.configuration for p in (full, low, cascade)] == ["3d_fullres", "3d_lowres", "3d_cascade_fullres"]
    assert cascade.previous_stage == "ph_3d_lowres.yaml" and "previous_stage" in capsys.readouterr().out
    sp_full, sp_low = np.array(full.resampling.target_spacing), np.array(low.resampling.target_spacing)
    assert np.all(sp_low >= sp_full) and np.any(sp_low > sp_full)
    assert "3d_lowres" in (plans / "ph_3d_lowres.yaml").read_text().split("configuration:")[0]
    # the cascade's network takes the low-resolution prediction as extra channels, and its estimate counts them
    assert input_channels(cascade) == 1 + 3
    assert estimate_for_plan(cascade) > estimate_for_plan(cascade.replace(configuration="3d_fullres",
                                                                          previous_stage=None))
    assert cascade.memory.estimate_gb == pytest.approx(estimate_for_plan(cascade), abs=0.01)
    assert len({p.dataset.work_dir for p in (full, low, cascade)}) == 3
    # 8 GB: the full-resolution patch covers the phantoms: 2d and 3d_fullres only, and the plan says why
    assert main(["plan", str(phantoms), "-o", str(tmp_path / "big" / "ph.yaml"), "--configurations", "all",
                 "--gpu-memory", "8"]) == 0
    assert sorted(p.name for p in (tmp_path / "big").glob("ph*.yaml")) == ["ph_2d.yaml", "ph_3d_fullres.yaml"]
    assert "no 3d_lowres" in (tmp_path / "big" / "ph_3d_fullres.yaml").read_text()
    capsys.readouterr()
    assert main(["plan", str(phantoms), "-o", str(tmp_path / "one.yaml"), "--configuration", "3d_lowres",
                 "--gpu-memory", "8"]) == 2
    assert "no 3d_lowres" in capsys.readouterr().err
    assert main(["plan", str(phantoms), "-o", str(tmp_path / "one.yaml"), "--configuration",
                 "3d_cascade_fullres"]) == 2
    assert "--configurations all" in capsys.readouterr().err
    assert main(["plan", str(phantoms), "-o", str(plans / "ph.yaml"), "--configurations", "all"]) == 2
    assert "--force" in capsys.readouterr().err   # nothing is overwritten


def test_a_cascade_whose_previous_stage_is_missing_or_not_3d_lowres_is_refused_by_key(phantoms, tmp_path, capsys):
    from segplan.runner.cli import main
    paths = plan_configurations(phantoms, tmp_path / "ph.yaml", gpu_memory=LOWRES_GPU_GB, progress=False)
    cascade, low = load_plan(paths["3d_cascade_fullres"]), load_plan(paths["3d_lowres"])
    edited = tmp_path / "edited.yaml"
    for stage, message in (("nope.yaml", r"previous_stage: .*nope.yaml does not exist"),
                           ("ph_2d.yaml", r"previous_stage: .*ph_2d.yaml is a '2d' plan"),
                           ("ph_3d_fullres.yaml", r"previous_stage: .*is a '3d_fullres' plan; a cascade builds on a "
                                                  r"3d_lowres plan")):
        save_plan(cascade.replace(previous_stage=stage), edited)
        with pytest.raises(SchemaError, match=message):
            load_plan(edited)
    assert main(["check", str(edited)]) == 2 and "previous_stage" in capsys.readouterr().err
    other = tmp_path / "other_lowres.yaml"
    save_plan(low.replace(dataset=dataclasses.replace(low.dataset, labels={"background": 0, "lungs": 1})), other)
    save_plan(cascade.replace(previous_stage=other.name), edited)
    with pytest.raises(SchemaError, match=r"previous_stage: .*dataset.labels"):
        load_plan(edited)
    save_plan(low.replace(cross_validation=dataclasses.replace(low.cross_validation, seed=1)), other)
    with pytest.raises(SchemaError, match=r"previous_stage: .*cross_validation"):
        load_plan(edited)
    save_plan(cascade.replace(previous_stage=None), edited)
    with pytest.raises(SchemaError, match=r"previous_stage: a 3d_cascade_fullres plan needs"):
        load_plan(edited)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fp=fingerprints(), budget=st.floats(0.1, 80.0), preset=st.sampled_from(["default", "cpu"]))
def test_lowres_and_cascade_plans_exactly_where_the_coverage_rule_says(fp, budget, preset):
    """nnU-Net's rule: a 3d_lowres (and with it a cascade) where the 3d_fullres patch covers under a
    quarter of the median image and a spacing exists at which a patch covers a quarter of an image
    at least 2x smaller; 2d always, slicing along the coarsest axis."""
    def make(c):
        if preset == "cpu":
            return make_cpu_plan(fp, "p", "ds", "w", probe=False, memory_gb=budget, configuration=c)
        return make_plan(fp, "p", "ds", "w", budget, "test", configuration=c)
    with deadline(20):
        family = plan_family(make)
    full, full_why = family["3d_fullres"]
    median = H.median_resampled_shape(fp, full.resampling.target_spacing)
    cov = math.prod(full.training.patch_size) / math.prod(median)
    assert {"2d", "3d_fullres"} <= set(family) and ("3d_lowres" in family) == ("3d_cascade_fullres" in family)
    event(f"{'3d_lowres' in family}, coverage {'under' if cov < LOWRES_COVERAGE else 'at least'} a quarter")
    if "3d_lowres" in family:
        low, cascade = family["3d_lowres"][0], family["3d_cascade_fullres"][0]
        low_median = H.median_resampled_shape(fp, low.resampling.target_spacing)
        assert cov < LOWRES_COVERAGE
        assert math.prod(low.training.patch_size) / math.prod(low_median) >= LOWRES_COVERAGE * (1 - 1e-6)
        assert math.prod(median) / math.prod(low_median) >= 2 * (1 - 1e-6)
        assert all(a >= b for a, b in zip(low.resampling.target_spacing, full.resampling.target_spacing))
        assert cascade.resampling == full.resampling and cascade.configuration == "3d_cascade_fullres"
        assert input_channels(cascade) == len(fp.channel_names) + len(fp.labels) - 1
    elif cov < LOWRES_COVERAGE:  # the spacing found left an image under 2x smaller: said, with the figure
        assert "under 2x" in full_why["configuration"]
    else:
        assert f"at least {LOWRES_COVERAGE:.0%}" in full_why["configuration"]
        with pytest.raises(NotApplicable):
            make("3d_lowres")
    two = family["2d"][0]
    assert two.slice_axis == int(np.argmax(two.resampling.target_spacing)) and len(two.training.patch_size) == 2
    in_plane = [m for a, m in enumerate(median) if a != two.slice_axis]
    div = pool_divisor(two.network)
    assert all(p % d == 0 and p <= max(d, math.ceil(math.ceil(m) / d) * d)
               for p, m, d in zip(two.training.patch_size, in_plane, div))


def test_the_benchmark_plans_phantoms_from_their_specs_as_from_their_files(phantoms, tmp_path):
    """benchmarks/configurations.py plans full-size phantoms from the generator's specifications: the
    same configurations, spacings and patches as the written files' fingerprint gives."""
    from benchmarks.configurations import phantom_fingerprint
    from segplan.planner.fingerprint import fingerprint_for
    files, _ = fingerprint_for(phantoms, tmp_path / "fp.yaml", progress=False)
    specs = phantom_fingerprint(len(files.cases), seed=3, scale=0.12)   # the phantoms fixture's (tests/conftest.py)
    for a, b in zip(files.cases, specs.cases):
        assert a.shape == a.cropped_shape == b.shape and np.allclose(a.spacing, b.spacing, rtol=1e-5)
    plans = [plan_family(lambda c, fp=fp: make_plan(fp, "p", "ds", "w", LOWRES_GPU_GB, "t", configuration=c))
             for fp in (files, specs)]
    assert list(plans[0]) == list(plans[1]) == ["2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres"]
    for c in plans[0]:
        a, b = plans[0][c][0], plans[1][c][0]
        assert a.resampling.target_spacing == pytest.approx(b.resampling.target_spacing, rel=1e-4)
        assert a.training.patch_size == b.training.patch_size and a.slice_axis == b.slice_axis


# ------------------------------------------------------------------ training and prediction (Keras)

def _predict_first_case(plan_path: Path, tmp_path: Path, *extra: str) -> tuple[np.ndarray, Path]:
    """Predict the plan's first case from a copy; returns its labels and the output folder, after
    checking they lie on the input's grid (shape, spacing, origin, direction)."""
    from segplan.planner.dataset import read_label, read_volume
    from segplan.runner.cli import main
    inp, out = tmp_path / "in", tmp_path / f"out{len(extra)}"
    image = first_case_input(plan_path, inp) if not inp.exists() else next(inp.iterdir())
    assert main(["predict", str(plan_path), "-i", str(inp), "-o", str(out), *extra]) == 0
    case = image.name.replace("_0000.nii.gz", "")
    labels, g = read_label(out / f"{case}.nii.gz")
    _, gi = read_volume(image)
    assert labels.shape == gi.shape and np.allclose(g.spacing, gi.spacing) and np.allclose(g.origin, gi.origin)
    assert np.allclose(g.direction, gi.direction) and set(np.unique(labels)) <= {0, 1, 2, 3}
    return labels, out


@needs_keras
def test_a_2d_fold_trains_resumes_exactly_predicts_on_the_original_grid_and_travels_in_a_bundle(phantoms, tmp_path):
    from segplan.runner.cli import main
    from segplan.runner.training.model import build_unet
    from tests.test_networks import _train_resume_predict
    plan_path = _train_resume_predict(phantoms, tmp_path, None, configuration="2d")
    plan = load_plan(plan_path)
    model = build_unet(plan.network, 1, 4)
    assert len(model.inputs[0].shape) == 4 and model.get_layer("enc0_conv0").kernel.shape == (3, 3, 1, 4)
    labels, out = _predict_first_case(plan_path, tmp_path, "--save-probabilities")
    probs = np.load(next(out.glob("*.npz")))["probabilities"]
    assert probs.shape == (4, *labels.shape) and np.allclose(probs.sum(0), 1, atol=1e-2)
    assert main(["export", str(plan_path), "-o", str(tmp_path / "m.zip"), "--folds", "0"]) == 0
    inp = tmp_path / "in"
    assert main(["predict", "--model", str(tmp_path / "m.zip"), "-i", str(inp), "-o", str(tmp_path / "b")]) == 0
    from segplan.planner.dataset import read_label
    assert np.array_equal(read_label(next((tmp_path / "b").glob("*.nii.gz")))[0], labels)
    from segplan.runner.workspace import PlanChanged, Workspace  # the fold's weights were trained on z slices
    save_plan(plan.replace(slice_axis=1), plan_path)
    with pytest.raises(PlanChanged, match="slice_axis"):
        Workspace(plan_path).fold_plan(0)


@needs_keras
def test_a_3d_lowres_fold_trains_resumes_and_predicts_on_the_original_grid(phantoms, tmp_path):
    from tests.test_networks import _train_resume_predict
    plan_path = _train_resume_predict(phantoms, tmp_path, None, configuration="3d_lowres")
    plan = load_plan(plan_path)
    full = load_plan(plan_dataset(phantoms, tmp_path / "full.yaml", gpu_memory=LOWRES_GPU_GB, progress=False))
    assert plan.configuration == "3d_lowres"
    assert np.prod(plan.resampling.target_spacing) > np.prod(full.resampling.target_spacing)
    _predict_first_case(plan_path, tmp_path)


@needs_keras
def test_the_probe_times_a_2d_plans_network(plan_2d):
    from segplan.planner.probing import candidate
    from segplan.planner.schema import to_plain
    from segplan.runner.training.probe import probe
    plan = load_plan(plan_2d)
    (m,) = probe([candidate(plan)], to_plain(plan.network), to_plain(plan.training.loss), 1, 4, steps=1)
    assert m["oom"] is False and m["seconds"] > 0 and m["window_seconds"] > 0
