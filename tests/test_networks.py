"""Deep supervision and nnU-Net's residual-encoder U-Net (issue 21): the level weights and the
down-sampled targets against a hand computation, the network each plan builds, and a fold of each
that trains, resumes exactly, predicts and travels in a bundle; plans written before still load."""
from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest

from segplan.planner.labels import consecutive
from segplan.planner.plan import NetworkSection, supervised_levels
from segplan.planner.plan_file import load_plan, save_plan
from segplan.runner.training.targets import downsample_labels, targets
from tests.tiny import FOUR_STAGES, first_case_input, tiny_plan

needs_keras = pytest.mark.skipif(importlib.util.find_spec("keras") is None, reason="keras is not installed")
ROOT = Path(__file__).resolve().parents[1]


def _net(n_stages: int, deep_supervision: bool = True, **kw) -> NetworkSection:
    pools = [[1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]][:n_stages - 1]
    net = NetworkSection([4 * 2 ** s for s in range(n_stages)], pools, [[3, 3, 3]] * n_stages, 2, "batch", 0.99,
                         "relu", "transpose", deep_supervision=deep_supervision)
    return dataclasses.replace(net, **kw)


def test_deep_supervision_levels_and_weights_by_hand():
    # 5 stages: 4 decoder outputs weighted 1, 1/2, 1/4, 1/8 -> the lowest set to 0 -> 1, 1/2, 1/4 over 7/4
    levels = supervised_levels(_net(5))
    assert [lv.stage for lv in levels] == [0, 1, 2]
    assert [lv.weight for lv in levels] == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    assert [lv.factors for lv in levels] == [[1, 1, 1], [1, 2, 2], [2, 4, 4]]   # cumulative pooling
    # 4 stages: 1, 1/2, (1/4 -> 0) over 3/2
    four = supervised_levels(_net(4))
    assert [lv.stage for lv in four] == [0, 1] and [lv.weight for lv in four] == pytest.approx([2 / 3, 1 / 3])
    # 6 stages: 1, 1/2, 1/4, 1/8 over 15/8
    assert [lv.weight for lv in supervised_levels(_net(6))] == pytest.approx([8 / 15, 4 / 15, 2 / 15, 1 / 15])
    # 3 stages: 1, (1/2 -> 0): the full resolution alone; likewise without deep supervision
    for net in (_net(3), _net(5, deep_supervision=False), _net(1)):
        (only,) = supervised_levels(net)
        assert (only.stage, only.factors, only.weight) == (0, [1, 1, 1], 1.0)


def test_downsampled_targets_by_hand():
    seg = np.arange(2 * 4 * 4).reshape(1, 2, 4, 4)          # (b, z, y, x), every voxel its own value
    # factor 2 on y and x: torch's nearest-exact picks source index floor((i + 0.5) * 2) = 1, 3
    assert downsample_labels(seg, [1, 2, 2]).tolist() == [[[[5, 7], [13, 15]], [[21, 23], [29, 31]]]]
    assert downsample_labels(seg, [2, 4, 4]).tolist() == [[[[26]]]]    # z 1, y 2, x 2: 16 + 8 + 2
    assert downsample_labels(seg, [1, 1, 1]).tolist() == seg.tolist()
    # the general rule, index by index, on a random 8 x 8 x 8 label batch
    lab = np.random.default_rng(0).integers(0, 3, (2, 8, 8, 8))
    down = downsample_labels(lab, [2, 4, 8])
    assert down.shape == (2, 4, 2, 1)
    for z, y, x in np.ndindex(4, 2, 1):
        assert np.array_equal(down[:, z, y, x], lab[:, int((z + 0.5) * 2), int((y + 0.5) * 4), int((x + 0.5) * 8)])
    # one one-hot target per supervised level, full resolution first
    y0, y1, y2 = targets(lab, consecutive(3), supervised_levels(_net(5)))
    assert y0.shape == (2, 8, 8, 8, 3) and y1.shape == (2, 8, 4, 4, 3) and y2.shape == (2, 4, 2, 2, 3)
    assert np.array_equal(np.argmax(y2, -1), lab[:, 1::2, 2::4, 2::4])
    assert targets(lab, consecutive(3), supervised_levels(_net(3))).shape == (2, 8, 8, 8, 3)   # one level: one array


@needs_keras
def test_deep_supervision_loss_is_the_weighted_sum_of_the_levels():
    """Keras' total loss is sum_k w_k (Tversky + CE)(level k), with the hand weights 2/3 and 1/3."""
    import keras
    from segplan.planner.plan import LossSection
    from segplan.runner.training.losses import compile_arguments, make_loss
    from segplan.runner.training.model import build_unet, prediction_model
    net = _net(4)
    levels = supervised_levels(net)
    model = build_unet(net, 1, 3)
    cfg = LossSection(0.5, 0.5, 1.0, 1.0, 1e-6)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), **compile_arguments(cfg, levels))
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 8, 16, 16, 1)).astype(np.float32)
    ys = targets(rng.integers(0, 3, (2, 8, 16, 16)), consecutive(3), levels)
    outs = model.predict_on_batch(x)
    assert [o.shape for o in outs] == [(2, 8, 16, 16, 3), (2, 8, 8, 8, 3)]
    loss = make_loss(cfg)
    by_hand = 2 / 3 * float(loss(ys[0], outs[0])) + 1 / 3 * float(loss(ys[1], outs[1]))
    assert float(model.test_on_batch(x, ys, return_dict=True)["loss"]) == pytest.approx(by_hand, rel=1e-5)
    # only the full-resolution output predicts
    assert np.allclose(prediction_model(model).predict_on_batch(x), outs[0], atol=1e-6)


@needs_keras
def test_residual_encoder_is_nnunets_resenc():
    """Stem, then per stage the planned residual blocks; the first block of a stage strides by the
    pooling with an average-pooled, projected skip; a decoder of one convolution per stage."""
    from segplan.planner.memory import count_parameters
    from segplan.runner.training.model import build_unet
    net = _net(4, architecture="residual_encoder", blocks_per_stage=[1, 3, 4, 6], convs_per_stage=1,
               activation="leaky_relu")
    model = build_unet(net, 2, 3)
    names = [layer.name for layer in model.layers]
    for s, n in enumerate([1, 3, 4, 6]):
        assert sum(name.startswith(f"enc{s}_block") and name.endswith("_add") for name in names) == n
    assert model.get_layer("stem_conv0").kernel.shape == (3, 3, 3, 2, 4)
    assert model.get_layer("enc1_block0_conv0").strides == (1, 2, 2)
    assert model.get_layer("enc2_block0_skip_pool").pool_size == (2, 2, 2)
    assert model.get_layer("enc2_block0_skip_conv").kernel.shape == (1, 1, 1, 8, 16)
    assert "enc2_block1_skip_conv" not in names and not any(n.startswith("pool") for n in names)
    assert "dec0_conv0" in names and "dec0_conv1" not in names
    out = model.predict_on_batch(np.zeros((1, 8, 32, 32, 2), np.float32))
    assert [o.shape for o in out] == [(1, 8, 32, 32, 3), (1, 8, 16, 16, 3)]
    assert model.count_params() == pytest.approx(count_parameters(net, 2, 3), rel=0.01)


@needs_keras
@pytest.mark.parametrize("architecture", ["plain", "residual_encoder"])
def test_instance_normalization_normalizes_each_image_on_its_own(architecture):
    """normalization: instance puts a per-channel instance norm (GroupNormalization, a group per
    channel) after every convolution: the prediction ignores the image's intensity scale (the
    convolutions before a norm have no bias) and one image's prediction does not depend on the
    others in its batch, which inference-mode batch norm with its moving statistics does not give."""
    from segplan.runner.training.model import build_unet
    blocks = {"blocks_per_stage": [1, 2, 2], "convs_per_stage": 1} if architecture == "residual_encoder" else {}
    net = _net(3, deep_supervision=False, normalization="instance", architecture=architecture, **blocks)
    model = build_unet(net, 1, 3)
    norms = [layer for layer in model.layers if layer.__class__.__name__ == "GroupNormalization"]
    assert norms and not any(layer.__class__.__name__ == "BatchNormalization" for layer in model.layers)
    assert all(layer.groups == layer.input.shape[-1] for layer in norms)  # one group per channel
    x = np.random.default_rng(0).normal(size=(2, 8, 16, 16, 1)).astype(np.float32)
    # random, not initial (gamma 1, beta 0), normalization weights, so the check is not trivial
    for layer in norms:
        layer.set_weights([w + np.random.default_rng(1).normal(0, 0.3, w.shape).astype(np.float32)
                           for w in layer.get_weights()])
    p = model.predict_on_batch(x)
    assert np.abs(model.predict_on_batch(7.0 * x) - p).max() < 1e-3
    assert np.abs(model.predict_on_batch(x[:1]) - p[:1]).max() < 1e-5
    batch = build_unet(dataclasses.replace(net, normalization="batch"), 1, 3)
    assert np.abs(batch.predict_on_batch(7.0 * x) - batch.predict_on_batch(x)).max() > 1e-2


def test_check_refuses_an_unknown_architecture_by_name(phantoms, tmp_path):
    from segplan.runner.cli import main
    path = tiny_plan(phantoms, tmp_path / "p.yaml")
    text = path.read_text()
    (tmp_path / "bad.yaml").write_text(text.replace("architecture: plain", "architecture: resnet50"))
    with pytest.raises(ValueError, match=r"network\.architecture: 'resnet50' is not one of \['plain', "
                                         r"'residual_encoder'\]"):
        load_plan(tmp_path / "bad.yaml")
    assert main(["check", str(tmp_path / "bad.yaml")]) == 2
    (tmp_path / "blocks.yaml").write_text(text.replace("architecture: plain", "architecture: residual_encoder"))
    with pytest.raises(ValueError, match=r"network\.blocks_per_stage: \[\]: a residual_encoder needs one count"):
        load_plan(tmp_path / "blocks.yaml")
    (tmp_path / "norm.yaml").write_text(text.replace("normalization: batch", "normalization: layer"))
    with pytest.raises(ValueError, match=r"network\.normalization: 'layer' is not one of \['batch', 'instance', "
                                         r"'none'\]"):
        load_plan(tmp_path / "norm.yaml")


def test_plans_written_before_load_as_the_plain_network_without_deep_supervision(phantoms, tmp_path):
    """plans/hippocampus.yaml predates these keys; a user's plan (or a fold's frozen plan) too.

    plans/hippocampus_cpu.yaml was regenerated since and says the same explicitly; with its network keys
    stripped it must still load as the plain network.
    """
    keys = re.compile(r"(?m)^  (architecture|blocks_per_stage|deep_supervision):.*\n")
    cpu = ROOT / "plans" / "hippocampus_cpu.yaml"
    assert len(keys.findall(cpu.read_text())) == 3
    (tmp_path / "old_cpu.yaml").write_text(keys.sub("", cpu.read_text()))
    assert not keys.search((ROOT / "plans" / "hippocampus.yaml").read_text())
    for path in (ROOT / "plans" / "hippocampus.yaml", tmp_path / "old_cpu.yaml", cpu):
        net = load_plan(path, check_paths=False).network
        assert (net.architecture, net.blocks_per_stage, net.deep_supervision) == ("plain", [], False)
    import yaml
    data = yaml.safe_load(tiny_plan(phantoms, tmp_path / "p.yaml", network=FOUR_STAGES).read_text())
    data["network"]["deep_supervision"] = True   # then written without the keys, as before this issue
    for key in ("architecture", "blocks_per_stage", "deep_supervision"):
        del data["network"][key]
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(data))
    net = load_plan(tmp_path / "old.yaml").network
    assert (net.architecture, net.deep_supervision) == ("plain", False) and len(supervised_levels(net)) == 1


def test_presets_say_why_deep_supervision_is_on_or_off(phantoms, tmp_path):
    from segplan.planner.planning import plan_dataset
    why = {"default": "on, as nnU-Net", "miscnn-covid19": "off: the paper's network has one output",
           "cpu": "off: on Hippocampus fold 0 it was a wash at 5 minutes"}
    for preset, on in (("default", True), ("miscnn-covid19", False), ("cpu", False)):
        path = plan_dataset(phantoms, tmp_path / f"{preset}.yaml", preset=preset, gpu_memory=4, progress=False,
                            probe=False)
        plan, text = load_plan(path), path.read_text()
        assert plan.network.deep_supervision is on and plan.network.architecture == "plain"
        comment = text[:text.index("  deep_supervision:")].splitlines()[-1]
        assert why[preset] in comment, comment
    assert "benchmarks/deep_supervision.py" in (tmp_path / "cpu.yaml").read_text()


def test_resenc_presets_plan_nnunets_residual_encoder_for_8_and_24_gb(phantoms, tmp_path):
    from segplan.planner import heuristics as H
    from segplan.planner.planning import plan_dataset
    m = load_plan(plan_dataset(phantoms, tmp_path / "m.yaml", preset="resenc-m", progress=False))
    big = load_plan(plan_dataset(phantoms, tmp_path / "l.yaml", preset="resenc-l", progress=False))
    mine = load_plan(plan_dataset(phantoms, tmp_path / "g.yaml", preset="resenc-m", gpu_memory=12, progress=False))
    default = load_plan(plan_dataset(phantoms, tmp_path / "d.yaml", preset="default", gpu_memory=8, progress=False))
    assert (m.memory.gpu_memory_gb, big.memory.gpu_memory_gb, mine.memory.gpu_memory_gb) == (8.0, 24.0, 12.0)
    assert "resenc-m preset's target" in m.memory.budget_source and mine.memory.budget_source == "--gpu-memory"
    for plan in (m, big, mine):
        net = plan.network
        assert plan.preset in ("resenc-m", "resenc-l") and net.architecture == "residual_encoder"
        assert net.blocks_per_stage == list(H.RESENC_BLOCKS[:len(net.filters)]) and net.convs_per_stage == 1
        assert net.deep_supervision and max(net.filters) <= 320
        assert plan.memory.estimate_gb <= plan.memory.gpu_memory_gb
    # without nnU-Net's 5% cap the 8 GB budget buys the ResEnc plan a larger batch than the default plan's
    assert "covers at most 5%" in (tmp_path / "d.yaml").read_text()
    assert m.training.batch_size > default.training.batch_size
    assert "blocks_per_stage: [1, 3, 4" in (tmp_path / "m.yaml").read_text()


def _losses(fold_dir: Path) -> list[float]:
    with open(fold_dir / "history.csv") as f:
        return [float(r["train_loss"]) for r in csv.DictReader(f)]


def _train_resume_predict(phantoms, tmp_path, network: dict | None, **plan) -> Path:
    """4 epochs straight and 2 + 2 resumed give the same losses; the fold predicts its validation
    cases; returns the resumed plan's path. ``plan``: more tiny_plan arguments (a configuration)."""
    from segplan.runner.pipeline import predict_validation
    from segplan.runner.training.train import train_fold
    from segplan.runner.workspace import Workspace
    kw = {"epochs": 4, "iterations": 2, "network": network, **plan}
    a = tiny_plan(phantoms, tmp_path / "a" / "p.yaml", **kw)
    fa = train_fold(Workspace(a), 0, progress=False, workers=1).dir
    b = tiny_plan(phantoms, tmp_path / "b" / "p.yaml", **kw)
    plan_b = load_plan(b)
    assert len(supervised_levels(plan_b.network)) == (2 if plan_b.network.deep_supervision else 1)
    save_plan(plan_b.replace(training=dataclasses.replace(plan_b.training, schedule=dataclasses.replace(
        plan_b.training.schedule, max_epochs=2))), b)
    train_fold(Workspace(b), 0, progress=False, workers=1)
    save_plan(plan_b, b)
    (b.parent / plan_b.dataset.work_dir / "fold_0" / "finished.json").unlink()
    fb = train_fold(Workspace(b), 0, resume=True, progress=False, workers=1).dir
    assert len(_losses(fb)) == 4 and _losses(fb) == pytest.approx(_losses(fa), rel=1e-4)
    with open(fb / "history.csv") as f:
        assert all(0.0 <= float(r["train_dice"]) <= 1.0 for r in csv.DictReader(f))  # the full-resolution metric
    predict_validation(Workspace(b), 0, progress=False)
    summary = (fb / "validation" / "summary.yaml").read_text()
    assert "missing_predictions: []" in summary
    return b


@needs_keras
@pytest.mark.e2e
def test_residual_encoder_fold_trains_resumes_predicts_and_travels_in_a_bundle(phantoms, tmp_path):
    """The resenc network with deep supervision: fold 0 resumed exactly and predicted; exported as a
    bundle, which predicts what the work folder predicts and starts a fine-tuning plan that keeps
    its architecture. (Deep supervision of the plain U-Net: test_regions' region fold.)"""
    from segplan.planner.dataset import read_label
    from segplan.planner.planning import plan_dataset
    from segplan.runner.cli import main
    net = {**FOUR_STAGES, "architecture": "residual_encoder", "blocks_per_stage": [1, 2, 2, 3], "convs_per_stage": 1,
           "activation": "leaky_relu", "deep_supervision": True}
    plan_path = _train_resume_predict(phantoms, tmp_path, net)
    bundle = tmp_path / "m.zip"
    assert main(["export", str(plan_path), "-o", str(bundle), "--folds", "0"]) == 0
    inp = tmp_path / "in"
    image = first_case_input(plan_path, inp)
    assert main(["predict", str(plan_path), "-i", str(inp), "-o", str(tmp_path / "work_pred"), "--folds", "0"]) == 0
    assert main(["predict", "--model", str(bundle), "-i", str(inp), "-o", str(tmp_path / "bundle_pred")]) == 0
    case = image.name.replace("_0000.nii.gz", ".nii.gz")
    assert np.array_equal(read_label(tmp_path / "work_pred" / case)[0], read_label(tmp_path / "bundle_pred" / case)[0])
    ft = load_plan(plan_dataset(phantoms, tmp_path / "ft" / "ft.yaml", gpu_memory=4, progress=False,
                                from_bundle=bundle))
    assert ft.network == load_plan(plan_path).network
    frozen = json.loads((Path(plan_path).parent / load_plan(plan_path).dataset.work_dir / "fold_0" /
                         "finished.json").read_text())
    assert frozen["epochs"] == 4


def test_the_benchmark_compares_plans_that_differ_in_deep_supervision_only(phantoms, tmp_path):
    """benchmarks/deep_supervision.py: the two variants of a plan, and the iterations a budget cut
    short (2 full epochs of 10, then 3 s of a third at 0.5 s/it)."""
    from benchmarks.deep_supervision import iterations, variants
    from segplan.planner.schema import to_plain
    plan = load_plan(tiny_plan(phantoms, tmp_path / "p.yaml", network=FOUR_STAGES))
    on, off = variants(plan, max_epochs=3).values()
    assert (on.network.deep_supervision, off.network.deep_supervision) == (True, False)
    assert on.dataset.work_dir != off.dataset.work_dir and on.name != off.name
    a, b = to_plain(on), to_plain(off)
    for d in (a, b):
        d.pop("name"), d["dataset"].pop("work_dir"), d["network"].pop("deep_supervision")
    assert a == b and on.training.schedule.max_epochs == 3
    rows = [{"seconds_per_iteration": "0.4"}, {"seconds_per_iteration": "0.6"}, {"seconds_per_iteration": "0.5"}]
    assert iterations(rows, 10, 0.4 * 10 + 0.6 * 10 + 3.0) == 26


@needs_keras
def test_the_probe_measures_the_planned_network_with_its_outputs_and_blocks(phantoms, tmp_path):
    """`--probe` and the CPU width probe time (and on a GPU measure) the plan's own network: the
    residual encoder's blocks and every supervised output with its weighted loss."""
    from segplan.planner.probing import candidate
    from segplan.planner.schema import to_plain
    from segplan.runner.training.probe import probe
    net = {**FOUR_STAGES, "architecture": "residual_encoder", "blocks_per_stage": [1, 2, 2, 3], "convs_per_stage": 1,
           "deep_supervision": True}
    plan = load_plan(tiny_plan(phantoms, tmp_path / "p.yaml", network=net))
    c = candidate(plan)
    assert c["blocks_per_stage"] == [1, 2, 2, 3]
    (m,) = probe([c], to_plain(plan.network), to_plain(plan.training.loss), 1, 4, steps=1)
    assert m["oom"] is False and m["seconds"] > 0 and m["window_seconds"] > 0 and m["peak_gb"] is None
    with pytest.raises(ValueError):  # a candidate's blocks must match its stages, as the plan's must
        probe([{**c, "blocks_per_stage": [1, 3]}], to_plain(plan.network), to_plain(plan.training.loss), 1, 4, steps=1)


@needs_keras
def test_the_width_probe_stops_at_the_first_candidate_too_slow(phantoms, tmp_path):
    """The CPU width probe measures narrowest first and stops after the first candidate over a
    limit (every wider one is slower still): with no limit every candidate is measured, with a limit
    no step can meet only the first is, and a limit on the prediction window stops it as well."""
    from segplan.planner.probing import candidate
    from segplan.planner.schema import to_plain
    from segplan.runner.training.probe import probe
    plan = load_plan(tiny_plan(phantoms, tmp_path / "p.yaml"))
    c = candidate(plan)
    both = [c, {**c, "filters": [2 * f for f in c["filters"]]}]
    args = (to_plain(plan.network), to_plain(plan.training.loss), 1, 4)
    assert len(probe(both, *args, steps=1, stop_above={"seconds": 1e9, "window_seconds": 1e9})) == 2
    assert len(probe(both, *args, steps=1, stop_above={"seconds": 1e-9})) == 1
    assert len(probe(both, *args, steps=1, stop_above={"seconds": 1e9, "window_seconds": 1e-9})) == 1
