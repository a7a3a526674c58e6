"""Region-based training and the ignore label (issue 24): nnU-Net's dataset.json read as nnU-Net
reads it, the plan's keys validated by name, region targets and their round trip through
regions_class_order, the loss and its gradient exactly zero on unannotated voxels, patch centres
on annotated voxels, metrics and postprocessing per region on annotated voxels, and tiny region
plans (with and without sparse annotations) that train, resume, predict and report by region."""
from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from segplan.planner.dataset import DatasetError, Geometry, read_label, write_volume
from segplan.planner.layouts import load_dataset
from segplan.planner.plan_file import load_plan
from segplan.planner.schema import SchemaError
from segplan.runner.evaluation.evaluate import case_metrics, evaluate_folder
from segplan.planner.labels import LabelModel, region_table, regions_to_labels
from segplan.runner.training.targets import downsample_labels, targets
from tests.tiny import FOUR_STAGES

needs_keras = pytest.mark.skipif(importlib.util.find_spec("keras") is None, reason="keras is not installed")
LABELS = {"background": 0, "label_1": 1, "label_2": 2, "label_3": 3}
# BraTS' nesting on the phantoms' labels: everything, then a part of it, then a part of that
REGIONS = {"lungs": [1, 2, 3], "right_lung": [2], "infection": [3]}
ORDER = [1, 2, 3]
REGION_MODEL = LabelModel(LABELS, REGIONS, ORDER)
SPARSE_REGIONS = LabelModel(LABELS, REGIONS, ORDER, ignore_label=9)
EYE = (1, 0, 0, 0, 1, 0, 0, 0, 1)


def _region_json(labels: dict, **extra) -> dict:
    return {"channel_names": {"0": "CT"}, "labels": labels, "file_ending": ".nii.gz", **extra}


@pytest.fixture(scope="module")
def region_data(phantoms, tmp_path_factory) -> Path:
    """The phantoms (1 left lung, 2 right lung, 3 infection) with a dataset.json in nnU-Net's region
    layout: lungs [1, 2, 3], right_lung [2], infection [3], regions_class_order [1, 2, 3]."""
    out = tmp_path_factory.mktemp("regions") / "ds"
    out.mkdir()
    for sub in ("imagesTr", "labelsTr"):
        (out / sub).symlink_to((phantoms / sub).resolve())
    labels = {"background": 0, **REGIONS}
    (out / "dataset.json").write_text(json.dumps(_region_json(labels, regions_class_order=ORDER)))
    return out


def _write_case(root: Path, cid: str, image: np.ndarray, label: np.ndarray) -> None:
    g = Geometry((2.0, 1.0, 1.0), (0.0, 0.0, 0.0), EYE, label.shape)
    write_volume(image.astype(np.int16), g, root / "imagesTr" / f"{cid}_0000.nii.gz")
    write_volume(label.astype(np.uint8), g, root / "labelsTr" / f"{cid}.nii.gz")


def test_dataset_json_regions_and_ignore_are_read_as_nnunet(tmp_path):
    """BraTS' dataset.json (labels as lists, regions_class_order, "ignore") is read as nnU-Net's
    LabelManager reads it; the fingerprint's class ratios and intensity sample leave the ignored
    voxels out; the plan carries regions, order and ignore label, says why, and passes check."""
    from segplan.planner.fingerprint import compute_fingerprint
    from segplan.planner.planning import check_plan_report, plan_dataset
    root = tmp_path / "Dataset900_Tiny"
    for i in range(2):
        label = np.zeros((6, 12, 12), np.uint8)
        label[1:5, 2:10, 2:10] = 1          # edema
        label[2:4, 4:8, 4:8] = 2            # core
        label[2:4, 5:7, 5:7] = 3            # enhancing
        label[:, :, 11] = 4                 # a column nobody annotated
        image = np.where(label == 4, 1000, 10 * label + i + 1)
        _write_case(root, f"case_{i}", image, label)
    meta = _region_json({"background": 0, "whole_tumor": [1, 2, 3], "tumor_core": [2, 3], "enhancing_tumor": 3,
                         "ignore": 4}, regions_class_order=[1, 2, 3])
    (root / "dataset.json").write_text(json.dumps(meta))
    ds = load_dataset(root)
    assert ds.labels == LABELS and ds.ignore_label == 4 and ds.regions_class_order == [1, 2, 3]
    assert ds.regions == {"whole_tumor": [1, 2, 3], "tumor_core": [2, 3], "enhancing_tumor": [3]}
    fp = compute_fingerprint(ds, progress=False)
    label = read_label(ds.cases[0].label_file)[0]
    annotated = np.count_nonzero(label != 4)
    assert fp.cases[0].ignored_voxels == label.size - annotated
    assert fp.class_ratio == pytest.approx([np.count_nonzero(label == v) / annotated for v in range(4)])
    assert fp.channels[0].max < 1000       # the unannotated voxels' intensities are not foreground
    plan_path = plan_dataset(root, tmp_path / "plans" / "tiny.yaml", preset="cpu", time_budget=None,
                             progress=False, probe=False)
    plan = load_plan(plan_path)
    assert (plan.dataset.regions, plan.dataset.regions_class_order, plan.dataset.ignore_label) == \
        (ds.regions, [1, 2, 3], 4)
    text = plan_path.read_text()
    assert "dataset.json writes labels as lists" in text and "dataset.json's 'ignore' label" in text
    report = check_plan_report(plan_path)
    assert "3 regions, one sigmoid output each" in report and "ignore label 4" in report
    del meta["regions_class_order"]
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="regions_class_order"):
        load_dataset(root)


@pytest.fixture(scope="module")
def region_plan(region_data, tmp_path_factory) -> Path:
    from segplan.planner.planning import plan_dataset
    return plan_dataset(region_data, tmp_path_factory.mktemp("rp") / "regions.yaml", preset="cpu",
                        time_budget=None, progress=False, probe=False)


@needs_keras
def test_a_region_plan_starts_each_sigmoid_at_its_prior(region_plan, region_data, tmp_path):
    """Issue 41, point 6: from p = 0.5 everywhere a short CPU budget left region plans over-segmented
    (Hippocampus, 3 minutes: 1.28x / 1.41x the reference volume); the planner starts each region's
    sigmoid at the log-odds of its share of the training voxels, counted here from the label files,
    and the network built from the plan has those biases; a wrong count is refused by key."""
    import dataclasses
    from segplan.planner.plan_file import save_plan
    from segplan.runner.training.model import plan_network
    plan = load_plan(region_plan)
    counts = np.zeros(4)
    for path in sorted((region_data / "labelsTr").iterdir()):
        counts += np.bincount(read_label(path)[0].ravel(), minlength=4)[:4]
    share = [counts[list(v)].sum() / counts.sum() for v in REGIONS.values()]
    np.testing.assert_allclose(plan.training.output_bias, np.log(np.array(share) / (1 - np.array(share))), atol=2e-3)
    bias = plan_network(plan).get_layer("logits").get_weights()[1]
    np.testing.assert_allclose(1 / (1 + np.exp(-bias)), share, rtol=5e-3)
    assert "starts at the log-odds of its share" in region_plan.read_text()
    bad = tmp_path / "bad.yaml"
    save_plan(plan.replace(training=dataclasses.replace(plan.training, output_bias=[-3.0])), bad)
    with pytest.raises(SchemaError, match=r"training.output_bias: .* values for the network's 3 outputs"):
        load_plan(bad)


def test_a_side_named_region_keeps_mirroring_off_the_left_right_axis(region_plan):
    """A region plan's labels are named by value (label_1, ...); its region names carry the sides:
    'right_lung' alone is enough, since a flip along x (the phantoms' left-right axis) would draw
    the left lung where the right one is and train it as 'right_lung'. Names merely containing
    'left'/'right' do not count; CamelCase and spaces do."""
    from segplan.planner.augmentation import _side_names
    plan = load_plan(region_plan)
    assert plan.training.augmentation.mirror_axes == [0, 1]
    assert "the labels name sides (right_lung)" in region_plan.read_text()
    assert _side_names(["cleft_palate", "bright_spot", "label_1", "LungLeft", "Right Kidney", "left_lung"]) == \
        ["LungLeft", "Right Kidney", "left_lung"]


@pytest.mark.parametrize("old,new,key,words", [
    ("lungs: [1, 2, 3]", "lungs: [1, 2, 7]", "dataset.regions.lungs", "[7] are not values of dataset.labels"),
    ("lungs: [1, 2, 3]", "lungs: []", "dataset.regions.lungs", "an empty region"),
    ("lungs: [1, 2, 3]", "lungs: [0, 1]", "dataset.regions.lungs", "holds background"),
    ("regions_class_order: [1, 2, 3]", "regions_class_order: [1, 2]", "dataset.regions_class_order",
     "2 values for the 3 regions"),
    ("regions_class_order: [1, 2, 3]", "regions_class_order: [1, 2, 9]", "dataset.regions_class_order.2",
     "9 is not a foreground value"),
    ("ignore_label: null", "ignore_label: 2", "dataset.ignore_label", "none of dataset.labels"),
    ("label_groups: {}", "label_groups: {pair: [label_1, label_2]}", "dataset.label_groups", "scored per region"),
])
def test_check_refuses_bad_regions_naming_the_key(region_plan, tmp_path, old, new, key, words):
    from segplan.runner.cli import main
    text = region_plan.read_text()
    assert old in text
    edited = region_plan.parent / f"edited_{tmp_path.name}.yaml"
    edited.write_text(text.replace(old, new))
    with pytest.raises(SchemaError) as e:
        load_plan(edited)
    assert key in str(e.value) and words in str(e.value), str(e.value)
    assert main(["check", str(edited)]) == 2


def test_check_refuses_an_order_without_regions(phantoms, tmp_path):
    from segplan.planner.planning import plan_dataset
    path = plan_dataset(phantoms, tmp_path / "p.yaml", preset="cpu", time_budget=None, progress=False, probe=False)
    plan = load_plan(path)
    assert plan.dataset.regions == {} and plan.dataset.ignore_label is None   # a plan as before
    path.write_text(path.read_text().replace("regions_class_order: []", "regions_class_order: [1]"))
    with pytest.raises(SchemaError, match="dataset.regions_class_order: without dataset.regions"):
        load_plan(path)


def test_region_targets_by_hand_with_deep_supervision_and_ignore():
    """Region masks from class indices; with deep supervision each level's masks are the full
    resolution's masks down-sampled nearest; with an ignore label (class index K) every channel is
    0 there and a last channel marks the annotated voxels."""
    from segplan.planner.plan import SupervisedLevel
    table = region_table(LABELS, REGIONS)
    assert table.tolist() == [[0, 0, 0], [1, 0, 0], [1, 1, 0], [1, 0, 1], [0, 0, 0]]
    seg = np.random.default_rng(1).integers(0, 5, (2, 4, 8, 8))      # 4 = K, the ignore label
    levels = [SupervisedLevel(0, [1, 1, 1], 2 / 3), SupervisedLevel(1, [1, 2, 2], 1 / 3)]
    y0, y1 = targets(seg, LabelModel(LABELS, REGIONS, ORDER, ignore_label=5), levels)
    assert y0.shape == (2, 4, 8, 8, 4) and y1.shape == (2, 4, 4, 4, 4)
    for r, members in enumerate(REGIONS.values()):
        assert np.array_equal(y0[..., r], np.isin(seg, members))
    assert np.array_equal(y0[..., 3], seg != 4) and not y0[seg == 4][:, :3].any()
    assert np.array_equal(y1, np.moveaxis(downsample_labels(np.moveaxis(y0, -1, 1), [1, 2, 2]), 1, -1))
    soft = targets(seg, LabelModel(LABELS, ignore_label=5))          # softmax plan with an ignore label
    assert soft.shape == (2, 4, 8, 8, 5) and not soft[seg == 4][:, :4].any()
    assert np.array_equal(soft[..., 4], seg != 4)
    assert np.array_equal(np.argmax(soft[..., :4], -1)[seg != 4], seg[seg != 4])
    assert np.array_equal(targets(seg.clip(0, 3), LabelModel(LABELS)), np.eye(4)[seg.clip(0, 3)])   # a plan without


@settings(max_examples=40, deadline=None)
@given(seg=arrays(np.uint8, st.tuples(st.integers(1, 5), st.integers(1, 6), st.integers(1, 6)),
                  elements=st.integers(0, 3)),
       margin=st.floats(0.01, 0.49))
def test_label_maps_round_trip_through_regions_class_order(seg, margin):
    """Any label map -> its region masks (as probabilities on the right side of 0.5) -> back through
    regions_class_order: the same map; exactly 0.5 is not a prediction."""
    masks = np.moveaxis(region_table(LABELS, REGIONS)[seg], -1, 0)
    assert np.array_equal(regions_to_labels(masks, ORDER), seg)
    probs = np.where(masks > 0, 0.5 + margin, 0.5 - margin)
    assert np.array_equal(regions_to_labels(probs, ORDER), seg)
    assert not regions_to_labels(np.full_like(probs, 0.5), ORDER).any()


@needs_keras
@pytest.mark.parametrize("regions", [False, True])
def test_loss_and_its_gradient_are_exactly_zero_on_ignored_voxels(regions):
    """The loss (Tversky + cross-entropy, or per region + binary cross-entropy) does not change
    whatever the network outputs on unannotated voxels, and its gradient there is exactly 0; the
    region loss equals a numpy computation of Tversky per region + mean BCE on annotated voxels."""
    import tensorflow as tf
    from segplan.planner.plan import LossSection
    from segplan.runner.training.losses import plan_loss
    cfg = LossSection(0.3, 0.7, 1.0, 1.0, 1e-6)
    rng = np.random.default_rng(0)
    seg = rng.integers(0, 5, (2, 4, 6, 6))
    lm = LabelModel(LABELS, REGIONS if regions else {}, ORDER if regions else [], ignore_label=5)
    y = targets(seg, lm)
    loss = plan_loss(cfg, lm)
    act = tf.sigmoid if regions else tf.nn.softmax
    logits = tf.Variable(rng.normal(size=(2, 4, 6, 6, 3 if regions else 4)).astype(np.float32))
    with tf.GradientTape() as tape:
        value = loss(y, act(logits))
    grad = tape.gradient(value, logits).numpy()
    ignored = seg == 4
    assert ignored.any() and np.all(grad[ignored] == 0.0) and np.all(np.abs(grad[~ignored]).sum(-1) > 0)
    other = np.where(ignored[..., None], rng.normal(size=logits.shape) * 50, logits.numpy()).astype(np.float32)
    assert float(loss(y, act(other))) == float(value)
    if regions:   # the same figure by hand
        p = np.clip(tf.sigmoid(logits).numpy().astype(np.float64), 1e-7, 1 - 1e-7)
        t, m = y[..., :3], y[..., 3:]
        tp, fn, fp = ((t * p * m).sum((1, 2, 3)), (t * (1 - p) * m).sum((1, 2, 3)), ((1 - t) * p * m).sum((1, 2, 3)))
        tversky = np.mean(3 - ((tp + 1e-6) / (tp + 0.3 * fn + 0.7 * fp + 1e-6)).sum(-1))
        bce = -(t * np.log(p) + (1 - t) * np.log(1 - p)).mean(-1)
        assert float(value) == pytest.approx(tversky + (bce * m[..., 0]).sum() / m.sum(), rel=1e-5)


@needs_keras
@pytest.mark.parametrize("regions", [False, True])
def test_the_masked_loss_with_nothing_ignored_is_the_plain_loss(regions):
    """An ignore label that marks no voxel changes nothing: the masked loss equals the plain one."""
    from segplan.planner.plan import LossSection
    from segplan.runner.training.losses import plan_loss
    cfg = LossSection(0.5, 0.5, 1.0, 1.0, 1e-6)
    rng = np.random.default_rng(2)
    seg = rng.integers(0, 4, (2, 4, 6, 6))
    dense = LabelModel(LABELS, REGIONS if regions else {}, ORDER if regions else [])
    sparse = LabelModel(LABELS, REGIONS if regions else {}, ORDER if regions else [], ignore_label=5)
    pred = rng.uniform(0.01, 0.99, (2, 4, 6, 6, 3 if regions else 4)).astype(np.float32)
    if not regions:
        pred /= pred.sum(-1, keepdims=True)
    masked = plan_loss(cfg, sparse)(targets(seg, sparse), pred)
    plain = plan_loss(cfg, dense)(targets(seg, dense), pred)
    assert float(masked) == pytest.approx(float(plain), rel=1e-6)


def test_region_metrics_against_a_hand_computation():
    """Per region, by hand: whole lungs, right lung, infection; an ignored stripe where the
    prediction is wrong changes nothing, and TN counts annotated voxels only."""
    ref = np.zeros((1, 4, 6), np.uint8)
    ref[0, :, 0:2] = 1
    ref[0, :, 2:4] = 2
    ref[0, 1:3, 3] = 3
    pred = ref.copy()
    pred[0, 0, 3] = 3            # right lung -> infection: right_lung FN, infection FP, lungs unchanged
    pred[0, :, 4] = 1            # 4 voxels of lung outside: lungs FP 4
    m = case_metrics(pred, ref, REGION_MODEL, (1.0, 1.0, 1.0))
    assert list(m) == ["lungs", "right_lung", "infection"]
    assert m["lungs"]["dice"] == pytest.approx(2 * 16 / (2 * 16 + 4))          # TP 16, FP 4
    assert m["right_lung"]["dice"] == pytest.approx(2 * 5 / (2 * 5 + 1))       # ref 6 voxels, pred 5 of them
    assert m["infection"]["dice"] == pytest.approx(2 * 2 / (2 * 2 + 1))        # ref 2, pred 3
    assert m["lungs"]["specificity"] == pytest.approx(4 / (4 + 4))             # TN: column 5, 4 voxels
    sparse = ref.copy()
    sparse[0, :, 4] = 9                                                        # the wrong column unannotated
    s = case_metrics(pred, sparse, SPARSE_REGIONS, (1.0, 1.0, 1.0))
    assert s["lungs"]["dice"] == 1.0 and s["lungs"]["specificity"] == 1.0
    assert s["lungs"]["ref_ml"] == m["lungs"]["ref_ml"] and s["lungs"]["pred_ml"] == pytest.approx(16 / 1000)
    assert s["infection"]["dice"] == m["infection"]["dice"]                    # annotated errors still count


def test_evaluation_skips_ignored_voxels_and_says_so(tmp_path):
    g = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), EYE, (4, 8, 8))
    ref = np.zeros((4, 8, 8), np.uint8)
    ref[1:3, 2:6, 2:6] = 1
    ref[0] = 5                                   # slice 0 not annotated
    pred = np.where(ref == 5, 1, ref).astype(np.uint8)   # wrong on all of slice 0, dense (no 5)
    for sub, arr in (("ref", ref), ("pred", pred)):
        (tmp_path / sub).mkdir()
        write_volume(arr, g, tmp_path / sub / "a.nii.gz")
    text = evaluate_folder(tmp_path / "pred", tmp_path / "ref", lm=LabelModel({"background": 0, "fg": 1}, ignore_label=5))
    summary = yaml.safe_load((tmp_path / "pred" / "summary.yaml").read_text())
    assert summary["classes"]["fg"]["dice"]["mean"] == 1.0
    assert "64 of the references' 256 voxels (25.0%) are not annotated and were not scored" in summary["ignored"]
    assert "not annotated and were not scored" in text


def test_patches_are_centred_on_annotated_voxels_only(tmp_path):
    """With an ignore label no patch is all unannotated: the random patches are centred on stored
    annotated voxels (nnU-Net's annotated_classes_key), the foreground ones on class voxels; a plan
    without keeps its plain random crops."""
    from segplan.planner.fileio import save_npy, save_npz, write_json
    from segplan.runner.training.data import PatchSampler
    from segplan.runner.preprocessing.preprocess import ANNOTATED, class_locations
    seg = np.full((40, 40, 40), 2, np.int8)     # K = 2: unannotated
    seg[30:34, 30:34, 30:34] = 0                 # a small annotated block ...
    seg[31:33, 31:33, 31:33] = 1                 # ... with foreground inside
    save_npy(tmp_path / "c.npy", np.zeros((1, 40, 40, 40), np.float32))
    save_npy(tmp_path / "c_seg.npy", seg)
    two = {"background": 0, "fg": 1}
    locs = class_locations(seg, LabelModel(two, ignore_label=5), np.random.default_rng(0))
    assert len(locs[ANNOTATED]) == 64 and len(locs["class_1"]) == 8
    save_npz(tmp_path / "c_locs.npz", **locs)
    write_json(tmp_path / "c.json", {"case_id": "c"})
    rng = np.random.default_rng(0)
    for fg in (0.0, 1.0):
        sampler = PatchSampler(tmp_path, ["c"], [8, 8, 8], fg)
        for _ in range(30):
            _, patch = sampler.sample(rng)
            assert (patch != 2).any()
    plain = class_locations(seg, LabelModel(two), np.random.default_rng(0))
    assert ANNOTATED not in plain
    save_npz(tmp_path / "c_locs.npz", **plain)
    crops = [PatchSampler(tmp_path, ["c"], [8, 8, 8], 0.0).sample(rng)[1] for _ in range(30)]
    assert sum((c != 2).any() for c in crops) < 10     # plain random crops mostly miss the block


def test_voxels_outside_the_image_are_not_annotated_with_an_ignore_label(region_plan, tmp_path):
    """What a patch or a rotation brings in from past the image's border is unannotated with an
    ignore label, not annotated background: the case is region "lungs" at every voxel, so a target
    voxel that the mask calls annotated must be in it. Counted as background, such voxels were 87%
    of a sparse Hippocampus batch's "annotated" voxels and starved the loss of foreground. A plan
    without an ignore label pads with background as before."""
    import dataclasses
    from segplan.planner.fileio import save_npy, save_npz, write_json
    from segplan.runner.training.batches import _make_source
    from segplan.planner.labels import label_model
    from segplan.runner.training.data import augmented_batch, to_keras
    from segplan.runner.preprocessing.preprocess import class_locations
    plan = load_plan(region_plan)
    aug = dataclasses.replace(plan.training.augmentation, rotation_p=1.0, scaling_p=1.0)
    plan = plan.replace(training=dataclasses.replace(plan.training, augmentation=aug))
    seg = np.ones((10, 40, 40), np.int8)                   # smaller than the patch on every axis: padded
    rng = np.random.default_rng(0)
    save_npy(tmp_path / "c.npy", rng.normal(size=(1, *seg.shape)).astype(np.float32))
    save_npy(tmp_path / "c_seg.npy", seg)
    sparse = plan.replace(dataset=dataclasses.replace(plan.dataset, ignore_label=9))
    save_npz(tmp_path / "c_locs.npz", **class_locations(seg, label_model(sparse), np.random.default_rng(0)))
    write_json(tmp_path / "c.json", {"case_id": "c"})
    for index in range(3):
        src = _make_source(str(tmp_path), ["c"], sparse)
        _, y = to_keras(augmented_batch(src["sampler"], src["augment"], sparse, 0, 0, index), label_model(sparse))
        lungs, annotated = y[..., 0], y[..., -1]
        assert annotated.any() and (~annotated.astype(bool)).any()
        assert (lungs[annotated == 1] == 1).all()          # no annotated voxel outside the lungs
    src = _make_source(str(tmp_path), ["c"], plan)
    _, y = to_keras(augmented_batch(src["sampler"], src["augment"], plan, 0, 0, 0), label_model(plan))
    assert y.shape[-1] == len(REGIONS) and (y[..., 0] == 0).any()   # no ignore label: padded with background


def _case_pair(stray_in: str) -> tuple[np.ndarray, np.ndarray]:
    """A reference with lungs (1, 2) and infection (3) annotated on slices 0-5 (slices 6-9 are the
    ignore label 9), and a prediction with a stray piece of left lung on annotated or ignored voxels."""
    ref = np.zeros((10, 20, 30), np.uint8)
    ref[1:9, 3:17, 2:12] = 1
    ref[1:9, 3:17, 16:27] = 2
    ref[3:5, 6:10, 4:8] = 3
    pred = ref.copy()
    ref[6:] = 9
    z = slice(0, 2) if stray_in == "annotated" else slice(8, 10)
    pred[z, 18:20, 13:15] = 1
    return pred, ref


def test_postprocessing_is_decided_per_region_on_annotated_voxels():
    from segplan.runner.postprocessing.postprocess import choose
    labels = {"background": 0, "left_lung": 1, "right_lung": 2, "infection": 3}
    regions = {"lungs": [1, 2, 3], "left_lung": [1], "infection": [3]}
    cases = [_case_pair("annotated"), _case_pair("annotated")]
    lm = LabelModel(labels, regions, [2, 1, 3], ignore_label=9)
    post = choose(cases, lm, [0])
    assert set(post.tried) == {"lungs", "left_lung", "infection"}         # the regions: 'lungs' is all foreground
    assert set(post.tried["left_lung"]) == {"lungs", "left_lung", "infection"}
    assert [r.keep_largest for r in post.rules] == ["left_lung"]          # the stray piece removed
    hidden = choose([_case_pair("ignored"), _case_pair("ignored")], lm, [0])
    assert hidden.rules == [] and "raises the mean Dice" in hidden.dropped["left_lung"]   # nothing to gain there


def test_sparse_copy_keeps_every_fourth_slice(region_data, tmp_path):
    from benchmarks.sparse_labels import sparse_copy, sparsify
    lab = np.arange(9)[:, None, None] * np.ones((9, 2, 2), np.uint8)
    assert sparsify(lab, 4, 7)[:, 0, 0].tolist() == [7, 7, 2, 7, 7, 7, 6, 7, 7]
    out, ignore, share = sparse_copy(region_data, tmp_path / "sparse")
    ds = load_dataset(out)
    assert ignore == 4 and ds.ignore_label == 4 and ds.regions == REGIONS
    for case in ds.cases:
        label = read_label(case.label_file)[0]
        kept = np.flatnonzero((label != 4).reshape(label.shape[0], -1).all(1))
        assert kept.tolist() == list(range(2, label.shape[0], 4))
        assert (label[[z for z in range(label.shape[0]) if z not in kept]] == 4).all()
    assert 0.2 < share < 0.3


@needs_keras
def test_region_plan_trains_resumes_and_predicts_label_maps(region_data, tmp_path):
    """A region plan (sigmoid outputs, Tversky + BCE per region) resumes exactly, scores its
    validation cases per region, and predicts label maps of regions_class_order's values with the
    input's geometry that are its saved region probabilities put back in order."""
    from segplan.runner.cli import main
    from tests.test_networks import _train_resume_predict
    from tests.tiny import first_case_input
    plan_path = _train_resume_predict(region_data, tmp_path, {"deep_supervision": True, **FOUR_STAGES})
    plan = load_plan(plan_path)
    assert plan.dataset.regions == REGIONS
    summary = yaml.safe_load((plan_path.parent / plan.dataset.work_dir / "fold_0" / "validation" /
                              "summary.yaml").read_text())
    assert list(summary["classes"]) == list(REGIONS)
    image = first_case_input(plan_path, tmp_path / "in")
    assert main(["predict", str(plan_path), "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"),
                 "--save-probabilities"]) == 0
    case = image.name.replace("_0000.nii.gz", "")
    labels, geom = read_label(tmp_path / "out" / f"{case}.nii.gz")
    _, input_geom = read_label(image)
    assert geom == input_geom and set(np.unique(labels)) <= {0, 1, 2, 3}
    with np.load(tmp_path / "out" / f"{case}.npz") as z:
        probs = z["probabilities"].astype(np.float32)
    assert probs.shape == (3, *labels.shape)
    near = (np.abs(probs - 0.5) < 1e-2).any(0)          # float16 on disk: a threshold's neighbourhood may flip
    assert np.array_equal(regions_to_labels(probs, ORDER)[~near], labels[~near])
    _region_onnx_says_what_it_holds(plan_path, tmp_path / "onnx", labels, tmp_path / "in")


def _region_onnx_says_what_it_holds(plan_path: Path, out: Path, predicted: np.ndarray, inp: Path) -> None:
    """Issue 41: a region plan's ONNX export names its output ``sigmoid`` and its metadata lists the
    regions, their order and how they become labels; through segplan's tiling it gives the label
    map `segplan predict` wrote."""
    import onnx   # the test extra installs tf2onnx, onnx and onnxruntime
    from segplan.planner.dataset import Case
    from segplan.runner.cli import main
    from segplan.runner.inference.case import predict_case
    from segplan.runner.inference.engines import onnxruntime_predictor as onnx_predictor
    assert main(["export", str(plan_path), "-o", str(out), "--format", "onnx", "--folds", "0"]) == 0
    model = onnx.load(str(out / "fold_0.onnx"))
    assert [o.name for o in model.graph.output] == ["sigmoid"]
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["segplan.output"] == "sigmoid" and json.loads(meta["segplan.output_channels"]) == list(REGIONS)
    assert json.loads(meta["segplan.regions"]) == REGIONS and json.loads(meta["segplan.regions_class_order"]) == ORDER
    assert meta["segplan.spatial_axes"] == "zyx" and "one sigmoid per region" in meta["segplan.layout"]
    plan = load_plan(plan_path)
    image = next(inp.iterdir())
    labels = predict_case(Case(image.name.replace("_0000.nii.gz", ""), (image,), None), plan,
                          onnx_predictor([out / "fold_0.onnx"])).labels
    assert np.mean(labels == predicted) > 0.999


@needs_keras
def test_sparse_region_plan_trains_predicts_dense_and_reports_by_region(region_data, tmp_path):
    """Regions and the ignore label together: both folds of a plan annotated on every fourth slice
    train, predict dense label maps (never the ignore value), and the CV report, the fold
    summaries and the postprocessing speak of regions and say what was not scored."""
    from benchmarks.sparse_labels import sparse_copy
    from segplan.runner.cli import main
    from tests.tiny import tiny_plan
    data, ignore, _ = sparse_copy(region_data, tmp_path / "sparse")
    plan_path = tiny_plan(data, tmp_path / "plans" / "sparse.yaml", epochs=1, iterations=2, folds=2)
    plan = load_plan(plan_path)
    assert plan.dataset.ignore_label == ignore and plan.dataset.regions == REGIONS
    for k in (0, 1):
        assert main(["run", str(plan_path), "--fold", str(k)]) == 0
    assert main(["summarize", str(plan_path)]) == 0
    work = plan_path.parent / plan.dataset.work_dir
    for k in (0, 1):
        val = work / f"fold_{k}" / "validation"
        for p in val.glob("*.nii.gz"):
            assert ignore not in np.unique(read_label(p)[0])
        assert "are not annotated and were not scored" in yaml.safe_load((val / "summary.yaml").read_text())["ignored"]
        with open(val / "metrics.csv") as f:
            assert {r["class"] for r in csv.DictReader(f)} == set(REGIONS)
    md = (work / "cv_summary.md").read_text()
    assert "lungs dice" in md and "infection dice" in md and f"ignore label {ignore}" in md
    tried = yaml.safe_load((work / "postprocessing.yaml").read_text())["tried"]
    assert set(tried) <= {"foreground", *REGIONS} and set(next(iter(tried.values()))) == set(REGIONS)
