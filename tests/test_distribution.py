"""Precision, proven on a CPU (issue 15): mixed precision trains in bfloat16 with float32 weights,
softmax and loss. (Several devices: tests/test_backends.py, Keras' DataParallel on JAX.)"""
from __future__ import annotations

import dataclasses
import importlib.util
import json

import numpy as np
import pytest

from segplan.planner.plan_file import load_plan, save_plan
from segplan.runner.workspace import Workspace
from tests.tiny import tiny_plan

needs_tf = pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="tensorflow is not installed")

@needs_tf
def test_mixed_precision_trains_in_bfloat16_with_float32_weights(phantoms, tmp_path):
    import h5py
    import keras
    from segplan.runner.training.train import compile_model, train_fold
    plan_path = tiny_plan(phantoms, tmp_path / "p.yaml", epochs=2, iterations=2)
    plan = load_plan(plan_path)
    save_plan(plan.replace(training=dataclasses.replace(plan.training, mixed_precision=True)), plan_path)
    try:
        fold = train_fold(Workspace(plan_path), 0, progress=False)
        model = compile_model(load_plan(plan_path), 1e-3)
        assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"   # CPU: bfloat16, no loss scaling
        assert model.get_layer("enc0_conv0").compute_dtype == "bfloat16"
        assert model.get_layer("enc0_conv0").kernel.dtype == "float32"
        assert model.output.dtype == "float32"                                 # softmax in float32
    finally:
        keras.mixed_precision.set_global_policy("float32")
    losses = [float(r.split(",")[1]) for r in fold.history.read_text().splitlines()[1:]]
    assert len(losses) == 2 and all(np.isfinite(losses))
    weights = fold.dir / json.loads(fold.pointer.read_text())["weights"]
    dtypes = set()
    with h5py.File(weights, "r") as f:
        f.visititems(lambda name, obj: dtypes.add(str(obj.dtype)) if isinstance(obj, h5py.Dataset) else None)
    assert {d for d in dtypes if "float" in d} == {"float32"}, dtypes   # no bfloat16 weights saved
