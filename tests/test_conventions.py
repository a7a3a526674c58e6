"""HU or 0..255 by evidence (issue 10): each convention from what the values show, 'unknown' where
they show none, reported by check-dataset and said in the plan."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from segplan.planner.intensity import detect_convention, to_hu


def _chest(seed: int = 0) -> np.ndarray:
    """A small chest-like HU volume: air around, soft tissue, lungs, some bone."""
    rng = np.random.default_rng(seed)
    v = np.full((10, 40, 40), -1000.0, np.float32)
    v[:, 5:35, 5:35] = 40.0
    v[:, 10:30, 8:18] = -850.0
    v[:, 10:30, 22:32] = -850.0
    v[:, 30:34, 18:22] = 900.0
    return v + rng.normal(0, 10, v.shape).astype(np.float32)


def _windowed(hu: np.ndarray, lo=-1250.0, hi=250.0) -> np.ndarray:
    return np.round(np.clip((hu - lo) / (hi - lo), 0, 1) * 255)


def test_hu_windowed_and_shifted_by_their_signatures():
    hu = _chest()
    assert detect_convention(hu.astype(np.int16), True) == "hu"
    assert detect_convention(_windowed(hu).astype(np.uint8), True) == "windowed"
    assert detect_convention(_windowed(hu).astype(np.float32), True) == "windowed"   # whole numbers as floats
    shifted = np.clip(hu + 1024, 0, None).astype(np.uint16)
    assert detect_convention(shifted, True) == "shifted_hu"
    assert np.allclose(to_hu(shifted, "shifted_hu"), np.clip(hu + 1024, 0, None).astype(np.uint16) - 1024.0)
    assert detect_convention(hu, False) == "other"


@pytest.mark.parametrize("name,make", [
    ("windowed as 0..1 floats", lambda hu: _windowed(hu) / 255.0),
    ("windowed padded with -1", lambda hu: np.pad(_windowed(hu), ((0, 0), (2, 2), (2, 2)), constant_values=-1)),
    ("HU cropped to soft tissue 0..200", lambda hu: np.clip(hu, 0, 200).round()),
])
def test_cases_without_evidence_are_unknown(name, make):
    """Each of these was read as HU or windowed by the old rule (values alone)."""
    assert detect_convention(make(_chest()).astype(np.float32), True) == "unknown", name


def test_unsigned_hu_is_not_read_as_hu_1024_off():
    shifted = np.clip(_chest() + 1024, 0, None).astype(np.uint16)
    hu = to_hu(shifted, detect_convention(shifted, True))
    assert np.percentile(hu, 1) < -900   # air back at about -1000 HU


def _write(arr: np.ndarray, path) -> None:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.0, 1.0, 2.0))
    sitk.WriteImage(img, str(path))


def test_plain_layout_decides_ct_on_most_images_and_check_names_unknown_cases(tmp_path):
    from segplan.planner.layouts import load_dataset
    from segplan.planner.integrity import check_dataset
    ds = tmp_path / "plain"
    (ds / "images").mkdir(parents=True)
    (ds / "labels").mkdir()
    lab = np.zeros((10, 40, 40), np.uint8)
    lab[:, 10:30, 8:18] = 1
    # the first image (sorted) is an HU crop without air: it alone must not decide the channel
    _write(np.clip(_chest(0), 0, 200).astype(np.int16), ds / "images" / "a_odd.nii.gz")
    for i in range(1, 5):
        _write(_chest(i).astype(np.int16), ds / "images" / f"b{i}.nii.gz")
    for p in (ds / "images").iterdir():
        _write(lab, ds / "labels" / p.name)
    d = load_dataset(ds)
    assert d.is_ct(0)
    _, problems = check_dataset(ds, progress=False)
    unknown = [p for p in problems if "no known unit" in p.message]
    assert [p.case for p in unknown] == ["a_odd"] and unknown[0].severity == "warning"
    # the plan says which convention it assumed for that case, and why
    from segplan.planner.plan_file import load_plan
    from segplan.planner.planning import plan_dataset
    out = plan_dataset(ds, tmp_path / "p.yaml", gpu_memory=4, progress=False)
    text = out.read_text()
    assert load_plan(out).intensity.conventions["a_odd"] == "hu"
    line = next(i for i, l in enumerate(text.splitlines()) if l.strip().startswith("a_odd:"))
    assert "ASSUMED" in text.splitlines()[line - 1]
