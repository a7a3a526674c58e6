"""The modality of a plain images/ + labels/ folder's channel (issue 19, point 2): CT only when
most cases show Hounsfield air. An int16 MRI (background 0, tissue up to ~1800) has the HU + 1024
look and must not be taken for CT; check-dataset names the CT-looking cases and says how to declare
the channel CT, and the plan says what the channel was taken for and from what."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from segplan.planner.layouts import load_dataset
from segplan.planner.integrity import check_dataset
from segplan.planner.plan_file import load_plan
from segplan.planner.planning import plan_dataset

def _write(arr: np.ndarray, path, spacing=(1.0, 1.0, 2.0)) -> None:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))


def _mri_like(seed: int) -> np.ndarray:
    """An int16 MRI-like volume: background exactly 0, a head of tissue 200..1800."""
    rng = np.random.default_rng(seed)
    v = np.zeros((12, 40, 40), np.int16)
    z, y, x = np.ogrid[:12, :40, :40]
    head = ((z - 6) / 5.5) ** 2 + ((y - 20) / 16) ** 2 + ((x - 20) / 16) ** 2 <= 1
    v[head] = rng.integers(200, 1800, int(head.sum()))
    return v


def _plain_mri(root):
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(5):
        arr = _mri_like(i)
        _write(arr, root / "images" / f"mr{i}.nii.gz")
        _write((arr > 1500).astype(np.uint8), root / "labels" / f"mr{i}.nii.gz")
    return root


def test_an_int16_mri_in_a_plain_folder_is_not_taken_for_ct(tmp_path):
    ds_dir = _plain_mri(tmp_path / "mri")
    ds = load_dataset(ds_dir)
    assert not ds.is_ct(0)
    meta = yaml.safe_load((ds_dir / "dataset.yaml").read_text())
    assert meta["channel_names"] == {0: "channel0"}
    assert "0 of 5 sampled images show Hounsfield air" in meta["inferred_channels"][0]["evidence"]
    # check-dataset warns once, naming the CT-looking cases and how to declare the channel CT
    _, problems = check_dataset(ds_dir, progress=False)
    looks = [p for p in problems if "look like CT" in p.message]
    assert len(looks) == 1 and looks[0].severity == "warning"
    assert all(f"mr{i} (the HU + 1024 look)" in looks[0].message for i in range(5))
    assert "channel_names: {0: CT}" in looks[0].message and looks[0].file == str(ds_dir / "dataset.yaml")
    # the plan: z-score per case, and it says what the channel was taken for and from what
    out = plan_dataset(ds_dir, tmp_path / "plans" / "mri.yaml", gpu_memory=4, progress=False)
    plan = load_plan(out)
    assert [(n.scheme, n.zscore) for n in plan.intensity.normalization] == [("zscore", "case")]
    assert plan.intensity.conventions == {}
    text = out.read_text()
    assert "channel0: not CT (z-score per case), inferred from the files: 0 of 5 sampled images" in text
    # declared CT by hand: re-planned as CT (not from the stale fingerprint), each case's unit detected
    meta["channel_names"] = {0: "CT"}
    (ds_dir / "dataset.yaml").write_text(yaml.safe_dump(meta))
    assert [p for p in check_dataset(ds_dir, progress=False)[1] if "look like CT" in p.message] == []
    plan = load_plan(plan_dataset(ds_dir, tmp_path / "plans" / "mri.yaml", gpu_memory=4, progress=False, force=True))
    assert plan.intensity.normalization[0].scheme == "ct"
    assert plan.intensity.conventions == {f"mr{i}": "shifted_hu" for i in range(5)}
    assert "CT: named 'CT' in dataset.yaml" in (tmp_path / "plans" / "mri.yaml").read_text()


def test_real_mri_as_int16_in_a_plain_folder_is_not_ct_and_real_ct_is(hippocampus, ct_example, tmp_path):
    root = tmp_path / "hippo"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for p in sorted((hippocampus / "imagesTr").iterdir())[:6]:
        cid = p.name[: -len("_0000.nii.gz")]
        img = sitk.ReadImage(str(p))
        as_int16 = sitk.GetImageFromArray(np.rint(sitk.GetArrayFromImage(img)).astype(np.int16))
        as_int16.CopyInformation(img)
        sitk.WriteImage(as_int16, str(root / "images" / f"{cid}.nii.gz"))
        shutil.copy(hippocampus / "labelsTr" / f"{cid}.nii.gz", root / "labels" / f"{cid}.nii.gz")
    ds = load_dataset(root)
    assert not ds.is_ct(0)
    assert "not CT" in ds.channel_source(0) and "Hounsfield air" in ds.channel_source(0)
    warned = [p for p in check_dataset(root, progress=False)[1] if "look like CT" in p.message]
    assert len(warned) == 1 and "hippocampus_003 (the HU + 1024 look)" in warned[0].message
    # the real CT, in HU, is still CT, from its air
    ds = load_dataset(ct_example)   # a read-only folder: inferred in memory
    assert ds.is_ct(0) and ds.channel_source(0).startswith("CT, inferred from the files: 1 of 1 sampled images show")
    assert [p for p in check_dataset(ct_example, progress=False)[1] if "look like CT" in p.message] == []


@pytest.mark.parametrize("looks,ct", [(["hu"] * 3, True), (["hu", "hu", "unknown"], True),
                                      (["shifted_hu"] * 5, False), (["windowed"] * 4 + ["hu"], False),
                                      (["hu", "windowed"], False), ([], False)])
def test_ct_only_when_most_images_show_hounsfield_air(looks, ct):
    from segplan.planner.intensity import infer_ct
    assert infer_ct(looks)[0] is ct
