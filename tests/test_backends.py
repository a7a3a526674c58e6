"""Keras 3 on another backend, with no TensorFlow at all (issue 15): plan, run, resume, predict,
evaluate and summarize through the command line under JAX (or PyTorch), with nnU-Net's residual
encoder and deep supervision, and the weights it trains predict under TensorFlow."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from segplan.runner.workspace import Workspace
from tests.tiny import FOUR_STAGES, tiny_plan

ROOT = Path(__file__).resolve().parents[1]
RESENC_DS = {**FOUR_STAGES, "architecture": "residual_encoder", "blocks_per_stage": [1, 2, 2, 3], "convs_per_stage": 1,
             "activation": "leaky_relu", "deep_supervision": True}
OTHER = next((b for b in ("jax", "torch") if importlib.util.find_spec(b)), None)

SCRIPT = """
import importlib.abc, sys
class NoTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "tensorflow":
            raise ImportError("tensorflow is blocked in this test")
sys.meta_path.insert(0, NoTensorFlow())
import dataclasses
from segplan.runner.cli import main
from segplan.planner.plan_file import load_plan, save_plan
plan_path, inp, out = sys.argv[1:4]
assert main(["run", plan_path, "--fold", "0"]) == 0
plan = load_plan(plan_path)
save_plan(plan.replace(training=dataclasses.replace(plan.training, schedule=dataclasses.replace(
    plan.training.schedule, max_epochs=3))), plan_path)
assert main(["run", plan_path, "--fold", "0", "--resume"]) == 0
assert main(["predict", plan_path, "-i", inp, "-o", out]) == 0
assert main(["summarize", plan_path]) == 0
import keras
print("BACKEND", keras.backend.backend(), "tensorflow" in sys.modules)
"""


@pytest.mark.e2e
def test_every_command_runs_on_another_backend_without_tensorflow(phantoms, tmp_path):
    if OTHER is None:
        if os.environ.get("CI"):
            pytest.fail("CI must run a non-TensorFlow backend: install the test extra (it brings jax)")
        pytest.skip("neither jax nor torch is installed (pip install -e '.[test]' brings jax)")
    # the most that runs through keras.ops: nnU-Net's residual encoder, trained with deep supervision
    plan_path = tiny_plan(phantoms, tmp_path / "p.yaml", epochs=2, iterations=2, network=RESENC_DS)
    ws = Workspace(plan_path)
    case = ws.dataset.cases[0]
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / case.image_files[0].name).symlink_to(case.image_files[0])
    env = {**os.environ, "KERAS_BACKEND": OTHER}
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(plan_path), str(inp), str(tmp_path / "out")], env=env,
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert f"BACKEND {OTHER} False" in r.stdout
    fold = ws.fold(0)
    assert json.loads(fold.finished.read_text())["epochs"] == 3            # resumed to the raised max_epochs
    assert fold.validation_summary.exists() and ws.cv_summary_md.exists()
    assert (tmp_path / "out" / f"{case.case_id}.nii.gz").exists()
    assert not fold.tensorboard.exists()                                   # a TensorFlow-only extra, skipped
    # the weights are Keras weights: TensorFlow (this process) predicts with them
    from segplan.runner.inference.predict import predict_folder
    predict_folder(plan_path, inp, tmp_path / "out_tf", folds=[0], progress=False)
    from segplan.planner.dataset import read_label
    a = read_label(tmp_path / "out" / f"{case.case_id}.nii.gz")[0]
    b = read_label(tmp_path / "out_tf" / f"{case.case_id}.nii.gz")[0]
    assert a.shape == b.shape and (a == b).mean() > 0.99, (a == b).mean()


DATA_PARALLEL = SCRIPT.split("import dataclasses")[0] + """
import dataclasses, json
from segplan.runner.cli import main
from segplan.planner.plan_file import load_plan, save_plan
plan_path, single_path = sys.argv[1:3]
assert main(["run", single_path, "--fold", "0"]) == 0
assert main(["run", plan_path, "--fold", "0", "--data-parallel"]) == 0
plan = load_plan(plan_path)
save_plan(plan.replace(training=dataclasses.replace(plan.training, schedule=dataclasses.replace(
    plan.training.schedule, max_epochs=3))), plan_path)
assert main(["run", plan_path, "--fold", "0", "--resume", "--data-parallel"]) == 0
"""


@pytest.mark.e2e
def test_data_parallel_over_two_devices_trains_resumes_and_matches_one_device(phantoms, tmp_path):
    """Keras' DataParallel (JAX) over two logical CPU devices: the batch of 2 is split, one sample
    per device (the layout Keras reports); training, checkpoint and resume work, and the losses are
    those of one device with the same global batch: the split changes where the step is computed,
    not what (batch norm over the global batch, gradients combined)."""
    if importlib.util.find_spec("jax") is None:
        if os.environ.get("CI"):
            pytest.fail("CI must run the data-parallel test: install the test extra (it brings jax)")
        pytest.skip("jax is not installed (pip install -e '.[test]' brings it)")
    plan_path = tiny_plan(phantoms, tmp_path / "dp" / "p.yaml", epochs=2, iterations=2)
    single = tiny_plan(phantoms, tmp_path / "one" / "p.yaml", epochs=2, iterations=2)
    env = {**os.environ, "KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    r = subprocess.run([sys.executable, "-c", DATA_PARALLEL, str(plan_path), str(single)], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "data parallel: batch 2 split along 'batch' over 2 devices (1 samples each" in r.stdout
    ws, one = Workspace(plan_path), Workspace(single)
    assert json.loads(ws.fold(0).finished.read_text())["epochs"] == 3 and ws.fold(0).validation_summary.exists()
    from segplan.runner.evaluation.tables import read_rows
    dp, sd = read_rows(ws.fold(0).history), read_rows(one.fold(0).history)
    assert len(dp) == 3 and len(sd) == 2
    for a, b in zip(dp[:2], sd):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3), (a, b)
