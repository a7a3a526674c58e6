import dataclasses
import importlib.util
import json
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from segplan.planner.dataset import Geometry, read_label, write_volume
from segplan.planner.layouts import load_dataset
from segplan.planner.plan_file import load_plan, save_plan
from segplan.runner.preprocessing.inversion import invert_probabilities
from segplan.runner.preprocessing.preprocess import labels_to_classes, preprocess_dataset, preprocess_image
from segplan.runner.splits import SplitError, load_or_make_splits, make_splits, validate_splits
from segplan.runner.workspace import Workspace, preprocessing_key
from tests.tiny import tiny_plan

# Keras-dependent tests are marked one by one: the pure-numpy tests of this module run without it
needs_keras = pytest.mark.skipif(importlib.util.find_spec("keras") is None, reason="keras is not installed")


@needs_keras
def test_tversky_half_half_equals_soft_dice():
    from segplan.runner.training.losses import soft_dice_loss, tversky_loss
    rng = np.random.default_rng(0)
    y = np.eye(3, dtype=np.float32)[rng.integers(0, 3, (2, 4, 5, 6))]
    p = rng.random((2, 4, 5, 6, 3)).astype(np.float32)
    p /= p.sum(-1, keepdims=True)
    tv = float(tversky_loss(y, p, 0.5, 0.5, 1e-6))
    assert tv == pytest.approx(float(soft_dice_loss(y, p, 1e-6)), rel=1e-5)
    # and by hand in numpy: 3 - sum_c 2TP / (|y| + |p|)
    tp = (y * p).sum((1, 2, 3))
    dice = 2 * tp / (y.sum((1, 2, 3)) + p.sum((1, 2, 3)))
    assert tv == pytest.approx(float(np.mean(3 - dice.sum(-1))), rel=1e-4)
    assert float(tversky_loss(y, p, 0.9, 0.1)) != pytest.approx(tv)


@needs_keras
def test_batch_dice_is_one_dice_over_the_batch_and_ignores_absent_classes_per_patch():
    """batch_dice sums TP/FN/FP over every patch of the batch (nnU-Net's batch_dice): the numpy
    oracle's one Dice per class; per-patch Tversky differs when a class is absent from one patch
    (its near-empty term counts as a full miss there), batch Dice does not."""
    from segplan.planner.plan import LossSection
    from segplan.runner.training.losses import make_loss
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, (2, 4, 5, 6))
    labels[0, :2] = 2  # class 2 only in the first patch
    y = np.eye(3, dtype=np.float32)[labels]
    p = rng.random((2, 4, 5, 6, 3)).astype(np.float32)
    p /= p.sum(-1, keepdims=True)
    cfg = LossSection(0.5, 0.5, 1.0, 0.0, 1e-6, batch_dice=True)
    tp = (y * p).sum((0, 1, 2, 3))
    oracle = 3 - (2 * tp / (y.sum((0, 1, 2, 3)) + p.sum((0, 1, 2, 3)))).sum()
    assert float(make_loss(cfg)(y, p)) == pytest.approx(float(oracle), rel=1e-4)
    tp = (y * p).sum((1, 2, 3))
    per_patch_dice = 2 * tp / (y.sum((1, 2, 3)) + p.sum((1, 2, 3)) + 2e-6)
    assert per_patch_dice[1, 2] < 1e-5  # class 2 absent from the second patch: a full miss there
    per_patch = float(make_loss(dataclasses.replace(cfg, batch_dice=False))(y, p))
    assert per_patch == pytest.approx(float(np.mean(3 - per_patch_dice.sum(-1))), rel=1e-4)
    assert per_patch > float(oracle) + 0.05


@needs_keras
def test_unet_matches_plan_topology():
    from segplan.planner.plan import NetworkSection
    from segplan.runner.training.model import build_unet
    net = NetworkSection([4, 8, 16], [[1, 2, 2], [2, 2, 2]], [[1, 3, 3], [3, 3, 3], [3, 3, 3]], 2, "batch", 0.99, "relu", "transpose")
    m = build_unet(net, 2, 4)
    out = m.predict_on_batch(np.zeros((1, 8, 32, 32, 2), np.float32))
    assert out.shape == (1, 8, 32, 32, 4) and np.allclose(out.sum(-1), 1, atol=1e-5)
    assert m.get_layer("enc0_conv0").kernel.shape == (1, 3, 3, 2, 4)
    assert m.get_layer("up0").strides == (1, 2, 2)
    assert m.get_layer("enc2_conv1").filters == 16


def test_preprocess_then_invert_restores_geometry_and_labels(phantoms, tmp_path):
    plan = load_plan(tiny_plan(phantoms, tmp_path / "p.yaml"))
    plan = plan.replace(resampling=dataclasses.replace(plan.resampling, target_spacing=[4.0, 2.0, 3.0]))
    shape = (9, 23, 31)
    g = Geometry((5.0, 1.3, 1.7), (12.0, -7.5, 3.25), (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0), shape)
    label = np.zeros(shape, np.uint8)
    label[2:7, 5:18, 4:14] = 1
    label[3:6, 8:14, 18:28] = 3
    image = (label.astype(np.float32) * 300 - 800)[None]
    data, seg, props = preprocess_image(image, g, plan, "x", label)
    # the plan brings the image (rotated in-plane) to its orientation first: sizes on that grid
    from segplan.planner.orientation import reorientation
    grid = reorientation(g, plan.dataset.orientation).geometry
    assert grid.shape == (9, 31, 23) and "orientation" in props
    assert data.shape[1:] == seg.shape == tuple(round(s * sp / t) for s, sp, t in zip(grid.shape, grid.spacing,
                                                                                       [4.0, 2.0, 3.0]))
    assert set(np.unique(seg)) <= {0, 1, 3}
    onehot = np.moveaxis(np.eye(4, dtype=np.float32)[seg], -1, 0)
    back = invert_probabilities(onehot, props, plan)
    assert back.shape == (4,) + shape
    restored = np.array([0, 1, 2, 3])[np.argmax(back, 0)]
    assert np.array_equal(invert_probabilities(onehot, props, plan, full=False), np.argmax(back, 0))
    dice = [2 * ((restored == k) & (label == k)).sum() / ((restored == k).sum() + (label == k).sum()) for k in (1, 3)]
    assert min(dice) > 0.85, dice
    out = tmp_path / "pred.nii.gz"
    write_volume(restored.astype(np.uint8), Geometry.from_dict(props["geometry"]), out)
    _, g2 = read_label(out)
    assert g2.shape == shape and np.allclose(g2.spacing, g.spacing) and np.allclose(g2.direction, g.direction)
    assert np.allclose(g2.origin, g.origin)


def test_non_consecutive_labels_map_to_classes(phantoms, tmp_path):
    plan = load_plan(tiny_plan(phantoms, tmp_path / "p.yaml"))
    plan = plan.replace(dataset=dataclasses.replace(plan.dataset, labels={"background": 0, "a": 5, "b": 117}))
    lab = np.array([[[0, 5, 117, 5]]])
    assert labels_to_classes(lab, plan).tolist() == [[[0, 1, 2, 1]]]


def test_cache_key_follows_preprocessing_fields_only(phantoms, tmp_path):
    plan = load_plan(tiny_plan(phantoms, tmp_path / "p.yaml"))
    longer = plan.replace(training=dataclasses.replace(plan.training, learning_rate=0.5))
    finer = plan.replace(resampling=dataclasses.replace(plan.resampling, target_spacing=[1.0, 1.0, 1.0]))
    assert preprocessing_key(plan) == preprocessing_key(longer) != preprocessing_key(finer)


def _kill_preprocess(plan_path):
    """Preprocess in a child that dwells before marking each case complete, so the parent's kill
    lands between a case's arrays and its properties file every time, not by luck of timing."""
    import segplan.runner.preprocessing.preprocess as pre
    write = pre.write_json

    def slow_marker(path, data, indent=None):
        if path.name.startswith("phantom_") and path.suffix == ".json":
            time.sleep(1.0)
        write(path, data, indent)
    pre.write_json = slow_marker
    pre.preprocess_dataset(Workspace(plan_path), workers=1, progress=False)


def test_killed_preprocessing_leaves_no_trusted_case(phantoms, tmp_path):
    """Killed once a case's arrays are being written: every case marked complete has complete arrays,
    the case caught half-way is not marked complete, and a rerun redoes it and clears the temp files."""
    plan_path = tiny_plan(phantoms, tmp_path / "p.yaml")
    ws = Workspace(plan_path)
    out = ws.preprocessed
    proc = mp.get_context("spawn").Process(target=_kill_preprocess, args=(plan_path,))
    proc.start()
    deadline = time.time() + 120
    while time.time() < deadline and not (out.exists() and any(out.glob("phantom_*.npy"))):
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    arrays = {p.name.split(".")[0].removesuffix("_seg") for p in out.glob("phantom_*.npy")}
    done = {p.stem for p in out.glob("phantom_*.json")}
    assert arrays, "the kill must land after a case's arrays were written"
    assert arrays - done, "a case caught between its arrays and its properties file must exist to test this"
    for cid in done:  # every case marked complete has complete arrays
        np.load(out / f"{cid}.npy", allow_pickle=False)
        np.load(out / f"{cid}_seg.npy", allow_pickle=False)
    preprocess_dataset(ws, workers=1, progress=False)
    assert len(list(out.glob("phantom_*.json"))) == 8
    for cid in arrays - done:  # the half-done case was redone in full
        assert np.load(out / f"{cid}_seg.npy", allow_pickle=False).shape == np.load(out / f"{cid}.npy").shape[1:]
    assert not list(out.glob(".tmp_*")), "temp files of the killed run are left behind"


def test_splits_seeded_written_once_and_validated(tmp_path):
    ids = [f"c{i}" for i in range(11)]
    s1 = make_splits(ids, 5, 1)
    assert s1 == make_splits(ids, 5, 1) and s1 != make_splits(ids, 5, 2)
    validate_splits(s1, ids, "x", 5)
    assert sorted(c for s in s1 for c in s["val"]) == sorted(ids)
    written = load_or_make_splits(tmp_path / "splits.yaml", ids, 5, 1)
    assert (tmp_path / "splits.yaml").exists() and load_or_make_splits(tmp_path / "splits.yaml", ids, 5, 99) == written
    bad = [dict(s) for s in s1]
    dup = bad[1]["val"][0]
    bad[0] = {"train": [c for c in bad[0]["train"] if c != dup], "val": bad[0]["val"] + [dup]}
    with pytest.raises(SplitError, match="validated in folds"):
        validate_splits(bad, ids, "x")
    with pytest.raises(SplitError, match="not in the dataset"):
        validate_splits([{"train": ["zz"], "val": ids}], ids, "x")


def test_given_splits_file_is_used(hippocampus, tmp_path):
    ds = load_dataset(hippocampus)
    given = hippocampus / "splits_final.json"
    splits = load_or_make_splits(tmp_path / "splits.yaml", [c.case_id for c in ds.cases], 5, 0, given)
    assert splits == json.loads(given.read_text()) and len(splits[0]["val"]) == 52
    assert not (tmp_path / "splits.yaml").exists()


@needs_keras
def test_augmentation_is_deterministic_with_a_seed(phantoms, tmp_path):
    from segplan.runner.training.data import PatchSampler, build_augmentation, make_batch
    plan_path = tiny_plan(phantoms, tmp_path / "p.yaml")
    plan = load_plan(plan_path)
    aug = dataclasses.replace(plan.training.augmentation, **{f: 1.0 for f in vars(plan.training.augmentation) if f.endswith("_p")})
    plan = plan.replace(training=dataclasses.replace(plan.training, augmentation=aug))
    pre = preprocess_dataset(Workspace(plan_path, plan), workers=1, progress=False)
    ids = [c.case_id for c in load_dataset(phantoms).cases]
    sampler = PatchSampler(pre, ids, plan.training.patch_size, 0.33)
    transform = build_augmentation(plan.training.augmentation, plan.training.patch_size)
    a = make_batch(sampler, transform, plan, 0, 3, 1)
    b = make_batch(sampler, transform, plan, 0, 3, 1)
    c = make_batch(sampler, transform, plan, 0, 3, 2)
    plain = make_batch(sampler, None, plan, 0, 3, 1)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[0], plain[0])
    assert a[0].shape == (2, 8, 32, 32, 1) and a[1].shape == (2, 8, 32, 32, 4)
    assert np.allclose(a[1].sum(-1), 1)


@needs_keras
def test_loss_falls_when_overfitting_one_case(phantoms, tmp_path):
    from segplan.runner.training.data import PatchSampler, make_batch
    from segplan.runner.training.train import compile_model
    plan_path = tiny_plan(phantoms, tmp_path / "p.yaml")
    plan = load_plan(plan_path)
    plan = plan.replace(training=dataclasses.replace(plan.training, learning_rate=1e-2))
    pre = preprocess_dataset(Workspace(plan_path, plan), workers=1, progress=False)
    sampler = PatchSampler(pre, ["phantom_000"], plan.training.patch_size, 1.0)
    x, y = make_batch(sampler, None, plan, 0, 0, 0)
    model = compile_model(plan, 1e-2)
    losses = [float(model.train_on_batch(x, y, return_dict=True)["loss"]) for _ in range(40)]
    assert np.mean(losses[-5:]) < 0.75 * np.mean(losses[:3]), losses


def _history(fold_dir: Path):
    import csv
    with open(fold_dir / "history.csv") as f:
        return list(csv.DictReader(f))


@needs_keras
def test_resume_equivalence(phantoms, tmp_path):
    from segplan.runner.training.train import FoldFinished, train_fold
    a = tiny_plan(phantoms, tmp_path / "a" / "p.yaml", epochs=4, iterations=2, plateau_patience=1,
                  plateau_cooldown=0, monitor="train_loss", plateau_min_delta=100.0)
    fa = train_fold(Workspace(a), 0, progress=False).dir
    b = tiny_plan(phantoms, tmp_path / "b" / "p.yaml", epochs=4, iterations=2, plateau_patience=1,
                  plateau_cooldown=0, monitor="train_loss", plateau_min_delta=100.0)
    plan_b = load_plan(b)
    save_plan(plan_b.replace(training=dataclasses.replace(plan_b.training, schedule=dataclasses.replace(
        plan_b.training.schedule, max_epochs=2))), b)
    train_fold(Workspace(b), 0, progress=False)
    save_plan(plan_b, b)  # the user raises max_epochs again and resumes
    (b.parent / plan_b.dataset.work_dir / "fold_0" / "finished.json").unlink()
    fb = train_fold(Workspace(b), 0, resume=True, progress=False).dir
    sa = json.loads((fa / "checkpoint_latest.json").read_text())["state"]
    sb = json.loads((fb / "checkpoint_latest.json").read_text())["state"]
    for k in ("epoch", "learning_rate", "lr_history", "plateau_wait", "stop_wait", "cooldown", "best_epoch", "stopped"):
        assert sa[k] == sb[k], k
    assert sa["epoch"] == 4 and sa["lr_history"][0] > sa["lr_history"][-1]  # the plateau rule fired
    assert [r["learning_rate"] for r in _history(fa)] == [r["learning_rate"] for r in _history(fb)]
    assert (fa / "checkpoint_best.weights.h5").exists() and (fa / "progress.png").exists()
    with pytest.raises(FoldFinished):
        train_fold(Workspace(a), 0, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        (fa / "finished.json").unlink()
        train_fold(Workspace(a), 0, progress=False)


@needs_keras
def test_sgd_is_nnunets_and_resumes_with_its_momentum(phantoms, tmp_path):
    """training.optimizer: sgd compiles nnU-Net's SGD (Nesterov, momentum 0.99, clip norm 12), and
    1 + 1 epochs resumed give the losses of 2 straight: the momentum buffers travel in the checkpoint
    (with them zeroed the second epoch's losses would differ)."""
    from segplan.runner.training.train import compile_model, train_fold

    def sgd_plan(name: str) -> Path:
        path = tiny_plan(phantoms, tmp_path / name / "p.yaml", epochs=2, iterations=2)
        plan = load_plan(path)
        save_plan(plan.replace(training=dataclasses.replace(plan.training, optimizer="sgd", learning_rate=0.01)), path)
        return path
    a, b = sgd_plan("a"), sgd_plan("b")
    opt = compile_model(load_plan(a), 0.01).optimizer
    assert (type(opt).__name__, float(opt.momentum), opt.nesterov, opt.clipnorm) == ("SGD", 0.99, True, 12.0)
    fa = train_fold(Workspace(a), 0, progress=False).dir
    plan_b = load_plan(b)
    save_plan(plan_b.replace(training=dataclasses.replace(plan_b.training, schedule=dataclasses.replace(
        plan_b.training.schedule, max_epochs=1))), b)
    train_fold(Workspace(b), 0, progress=False)
    save_plan(plan_b, b)
    (b.parent / plan_b.dataset.work_dir / "fold_0" / "finished.json").unlink()
    fb = train_fold(Workspace(b), 0, resume=True, progress=False).dir
    losses = [[float(r["train_loss"]) for r in _history(f)] for f in (fa, fb)]
    assert len(losses[0]) == 2 and losses[1] == pytest.approx(losses[0], rel=1e-4)


@needs_keras
def test_time_budget_stops_and_keeps_a_usable_best_checkpoint(phantoms, tmp_path):
    from segplan.runner.inference.models import load_fold_models
    from segplan.runner.training.train import train_fold
    p = tiny_plan(phantoms, tmp_path / "p.yaml", epochs=1000, iterations=2)
    plan = load_plan(p)
    plan = plan.replace(training=dataclasses.replace(plan.training, schedule=dataclasses.replace(
        plan.training.schedule, time_budget_minutes=0.1, early_stopping_patience=1000)))  # the budget alone stops it
    save_plan(plan, p)
    t = time.perf_counter()
    fold = train_fold(Workspace(p), 0, progress=False).dir
    assert time.perf_counter() - t < 120
    done = json.loads((fold / "finished.json").read_text())
    assert "time budget" in done["reason"] and done["epochs"] < 1000
    lrs = [float(r["learning_rate"]) for r in _history(fold)]
    assert lrs == sorted(lrs, reverse=True)  # decays over the budget
    model = load_fold_models(Workspace(p), [0])[1][0]
    assert model.predict_on_batch(np.zeros((1, 8, 32, 32, 1), np.float32)).shape == (1, 8, 32, 32, 4)


@needs_keras
def test_sigkill_during_training_resumes_from_the_last_checkpoint(phantoms, tmp_path):
    """Checkpoints come every epoch or, for short epochs, once the loop has run 100 times what the
    last one cost: a kill loses at most that, never the pointer or the weights it names."""
    import subprocess
    import sys
    from segplan.runner.training.train import train_fold
    from segplan.runner.evaluation.tables import read_rows
    p = tiny_plan(phantoms, tmp_path / "p.yaml", epochs=100_000, iterations=2, early_stopping_patience=100_000)
    fold = tmp_path / load_plan(p).dataset.work_dir / "fold_0"
    proc = subprocess.Popen([sys.executable, "-m", "segplan.runner.cli", "run", str(p), "--fold", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=Path(__file__).parents[1])
    pointer = fold / "checkpoint_latest.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        if pointer.exists() and json.loads(pointer.read_text())["state"]["epoch"] >= 1:
            break
        time.sleep(0.05)
    time.sleep(2.0)  # epochs past the checkpoint: history rows that resume must drop
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = json.loads(pointer.read_text())["state"]  # never half-written
    done = state["epoch"]
    assert done >= 1 and (fold / json.loads(pointer.read_text())["weights"]).exists()
    plan = load_plan(p)
    save_plan(plan.replace(training=dataclasses.replace(plan.training, schedule=dataclasses.replace(
        plan.training.schedule, max_epochs=done + 1))), p)
    train_fold(Workspace(p), 0, resume=True, progress=False)
    rows = read_rows(fold / "history.csv")
    assert [r["epoch"] for r in rows] == list(range(done + 1))
    assert json.loads(pointer.read_text())["state"]["epoch"] == done + 1


@needs_keras
def test_validation_every_k_epochs_and_after_the_last(phantoms, tmp_path):
    """validation_every 3 over 7 epochs scores epochs 0, 3, 6 (6 is also the last); the others have
    no validation figures; the plot and the best checkpoint exist at the end; with monitor: val_loss
    the plan must validate every epoch (refused by key)."""
    import math
    from segplan.planner.schema import SchemaError
    from segplan.runner.training.train import train_fold
    p = tiny_plan(phantoms, tmp_path / "p.yaml", epochs=8, iterations=1, validation_every=3,
                  early_stopping_patience=100)
    plan = load_plan(p)
    save_plan(plan.replace(training=dataclasses.replace(plan.training, schedule=dataclasses.replace(
        plan.training.schedule, max_epochs=7))), p)
    fold = train_fold(Workspace(p), 0, progress=False).dir
    scored = [int(r["epoch"]) for r in _history(fold) if not math.isnan(float(r["val_loss"]))]
    assert scored == [0, 3, 6]
    assert (fold / "progress.png").exists() and (fold / "checkpoint_best.weights.h5").exists()
    done = json.loads((fold / "finished.json").read_text())
    assert 0 < done["step_seconds"] <= done["loop_seconds"] and 0 <= done["outside_steps_share"] < 1
    # validation ran 3 times, bookkeeping at least once (the end): both inside the loop, outside the steps
    assert 0 < done["validation_seconds"] and 0 < done["bookkeeping_seconds"] and 0 <= done["batch_wait_seconds"]
    parts = ("step_seconds", "validation_seconds", "bookkeeping_seconds", "batch_wait_seconds")
    assert sum(done[k] for k in parts) <= done["loop_seconds"] + 0.3  # each rounded to 0.1 s
    save_plan(plan.replace(training=dataclasses.replace(plan.training, schedule=dataclasses.replace(
        plan.training.schedule, monitor="val_loss"))), p)
    with pytest.raises(SchemaError, match="training.schedule.validation_every"):
        load_plan(p)


@needs_keras
def test_validation_loss_from_one_forward_pass_equals_keras_evaluation(phantoms, tmp_path):
    """_validate computes the loss from the outputs of one forward pass: with deep supervision it
    equals what Keras' own evaluation (test_on_batch) reports, level weights included."""
    from segplan.runner.training.data import validation_batches
    from segplan.runner.preprocessing.preprocess import preprocess_dataset
    from segplan.runner.training.train import _validate, compile_model
    p = tiny_plan(phantoms, tmp_path / "p.yaml", network={"deep_supervision": True, "filters": [4, 8, 16, 16],
                                                          "pool_sizes": [[1, 2, 2], [2, 2, 2], [1, 2, 2]],
                                                          "kernel_sizes": [[1, 3, 3]] + [[3, 3, 3]] * 3},
                  validation_patches=4)
    ws = Workspace(p)
    plan = ws.freeze(0)
    val = validation_batches(preprocess_dataset(ws, workers=1, progress=False), ws.splits()[0]["val"], plan, 0)
    model = compile_model(plan, 1e-3)
    assert len(model.outputs) > 1
    keras_loss = np.mean([model.test_on_batch(x, y, return_dict=True)["loss"] for x, y in val])
    loss, dice = _validate(model, val, plan)
    assert loss == pytest.approx(keras_loss, rel=1e-5) and 0 <= dice <= 1
