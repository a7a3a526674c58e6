"""Fine-tuning from a bundle (issue 13): `plan --from` keeps what the weights depend on and points
at the bundle's weights; training starts from them, a different class count re-initialises only
the last layer."""
from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest

from segplan.planner.plan_file import load_plan, save_plan
from segplan.planner.planning import plan_dataset
from segplan.runner.cli import main
from tests.tiny import tiny_plan


@pytest.mark.e2e
def test_plan_from_a_bundle_and_start_from_its_weights(phantoms, tmp_path):
    import keras
    from segplan.runner.training.model import build_unet
    from segplan.runner.training.train import compile_model, load_initial_weights
    src = tiny_plan(phantoms, tmp_path / "a" / "p.yaml", epochs=1, iterations=2)
    for k in (0, 1):
        assert main(["run", str(src), "--fold", str(k)]) == 0
    bundle = tmp_path / "m.zip"
    assert main(["export", str(src), "-o", str(bundle)]) == 0
    old = load_plan(src)
    new_path = plan_dataset(phantoms, tmp_path / "b" / "ft.yaml", gpu_memory=4, progress=False, from_bundle=bundle)
    new = load_plan(new_path)                           # validated, initial weights file included
    assert new.network == old.network and new.resampling == old.resampling
    assert new.intensity.normalization == old.intensity.normalization
    assert new.training.initial_weights == "ft.initial.weights.h5"
    text = new_path.read_text()
    assert "kept from m.zip" in text and "fold 0's weights from m.zip" in text
    # a dataset stored otherwise is brought to the orientation the weights learnt, not to its own
    import shutil

    import SimpleITK as sitk
    ras = tmp_path / "ras"
    shutil.copytree(phantoms, ras)
    for path in [*(ras / "imagesTr").iterdir(), *(ras / "labelsTr").iterdir()]:
        sitk.WriteImage(sitk.DICOMOrient(sitk.ReadImage(str(path)), "RAS"), str(path))
    ras_plan = load_plan(plan_dataset(ras, tmp_path / "c" / "ras.yaml", gpu_memory=4, progress=False,
                                      from_bundle=bundle))
    assert old.dataset.orientation == ras_plan.dataset.orientation == "LPS"
    # a fresh fold starts from those weights: its first layer equals the bundle's fold 0
    ref = build_unet(old.network, 1, len(old.dataset.labels))
    ref.load_weights(str(new_path.parent / new.training.initial_weights))
    model = compile_model(new, 1e-3)
    with warnings.catch_warnings(record=True) as caught:  # the bundle's optimiser state is left out quietly
        warnings.simplefilter("always")
        load_initial_weights(model, new_path.parent / new.training.initial_weights)
    assert not [w for w in caught if "optimizer" in str(w.message)], [str(w.message) for w in caught]
    assert np.array_equal(model.get_layer("enc0_conv0").kernel.numpy(), ref.get_layer("enc0_conv0").kernel.numpy())
    # another class count: only the head is new
    three = dataclasses.replace(new.dataset, labels={"background": 0, "left_lung": 1, "right_lung": 2},
                                label_groups={})
    small = compile_model(new.replace(dataset=three), 1e-3)
    load_initial_weights(small, new_path.parent / new.training.initial_weights)
    assert np.array_equal(small.get_layer("enc1_conv1").kernel.numpy(), ref.get_layer("enc1_conv1").kernel.numpy())
    assert small.get_layer("logits").kernel.shape[-1] == 3 != ref.get_layer("logits").kernel.shape[-1]
    # and a fold of the fine-tuning plan trains (kept tiny here: 1 epoch of 2 small batches)
    save_plan(new.replace(training=dataclasses.replace(new.training, patch_size=[8, 32, 32], batch_size=2, workers=0,
                                                       schedule=dataclasses.replace(new.training.schedule, max_epochs=1,
                                                                                    iterations_per_epoch=2))), new_path)
    assert main(["run", str(new_path), "--fold", "0"]) == 0
    keras.backend.clear_session()
