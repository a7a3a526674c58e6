"""One orientation (issue 41): every image is brought to the plan's orientation by axis permutation
and flips before preprocessing, and its prediction written back in its own orientation and
geometry, so one CT stored LPS, RAS, with its axes permuted, or as a DICOM series gets the same
labels in world space. The reorientation is checked against SimpleITK's DICOMOrient (an
independent implementation) on random, also oblique, directions; the planner records the
majority, check-dataset names the others, and a plan without the key behaves as before."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from segplan.planner.dataset import Geometry, read_volume, to_sitk
from segplan.planner.orientation import orient, orientation_code, reorientation, unorient, valid_code
from segplan.planner.plan_file import load_plan, save_plan
from segplan.planner.schema import SchemaError

CODES = ["LPS", "RAS", "RPI", "SAL", "ILP", "PIR", "ASR"]


@settings(max_examples=120, deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1), code=st.sampled_from(CODES), oblique=st.booleans())
def test_reorientation_is_dicomorients_and_goes_back_exactly(seed, code, oblique):
    """The array, spacing, origin and direction are SimpleITK.DICOMOrient's for any axis-aligned or
    oblique direction, however tilted (an oblique image keeps its tilt), and ``unorient`` restores
    the input bit for bit: no interpolation anywhere."""
    rng = np.random.default_rng(seed)
    d = np.zeros((3, 3))
    for j, (i, s) in enumerate(zip(rng.permutation(3), rng.choice([-1.0, 1.0], 3))):
        d[i, j] = s
    if oblique:   # any rotation, up to the most oblique: ITK's nearest code decides, as in DICOMOrient
        d = Rotation.random(random_state=seed).as_matrix()
    shape = tuple(int(v) for v in rng.integers(2, 7, 3))
    geom = Geometry(tuple(float(v) for v in rng.uniform(0.4, 4.0, 3)), tuple(float(v) for v in rng.normal(0, 80, 3)),
                    tuple(d.ravel()), shape)
    arr = rng.integers(-1000, 1000, shape).astype(np.int16)
    r = reorientation(geom, code)
    got = orient(arr, r)
    want = sitk.DICOMOrient(to_sitk(arr, geom), code)
    assert np.array_equal(got, sitk.GetArrayFromImage(want))
    np.testing.assert_allclose(r.geometry.direction, want.GetDirection(), atol=1e-9)
    np.testing.assert_allclose(r.geometry.origin, want.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(r.geometry.spacing, want.GetSpacing()[::-1], atol=1e-12)
    assert r.geometry.shape == got.shape
    if not oblique:
        assert orientation_code(r.geometry.direction) == code
    assert np.array_equal(unorient(got, r), arr)
    channels = np.stack([arr, arr + 1])                                   # (c, z, y, x): the last three axes
    assert np.array_equal(orient(channels, r)[1], got + 1)
    assert np.array_equal(unorient(orient(channels, r), r), channels)


def test_orientation_codes_are_checked_by_key(phantoms, tmp_path):
    from tests.tiny import tiny_plan
    path = tiny_plan(phantoms, tmp_path / "p.yaml")
    plan = load_plan(path)
    assert plan.dataset.orientation == "LPS"          # the phantoms: SimpleITK's identity direction
    assert valid_code("ras") and not valid_code("LRS") and not valid_code("LP")
    save_plan(plan.replace(dataset=dataclasses.replace(plan.dataset, orientation="LRS")), path)
    with pytest.raises(SchemaError, match=r"dataset.orientation: 'LRS' is no orientation"):
        load_plan(path)


def _stored(img: sitk.Image, code: str) -> sitk.Image:
    """The same CT stored in another orientation (the voxels permuted and flipped, the world unchanged)."""
    return sitk.DICOMOrient(img, code)


def _world_equal(a: sitk.Image, b: sitk.Image) -> float:
    """Share of voxels on which two label maps of one CT agree in world space (``b`` brought to ``a``'s grid)."""
    code = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(a.GetDirection())
    b = sitk.DICOMOrient(b, code)
    np.testing.assert_allclose(b.GetOrigin(), a.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(b.GetDirection(), a.GetDirection(), atol=1e-6)
    return float(np.mean(sitk.GetArrayFromImage(a) == sitk.GetArrayFromImage(b)))


@pytest.mark.e2e
def test_one_ct_stored_lps_ras_permuted_and_as_dicom_gets_the_same_labels_in_world_space(trained_cv, tmp_path):
    """The trained tiny plan predicts one phantom CT as stored (LPS), as a RAS copy, as a copy with its
    axes permuted (SAL) and as a DICOM series of the RAS copy: every prediction lies on its own
    input's grid, and in world space they agree voxel for voxel (the DICOM series to 99.9%: its
    header stores geometry as decimal strings). Without the plan's orientation the RAS copy is seen
    mirrored and labelled otherwise: what the test guards against."""
    from segplan.runner.inference.predictor import Predictor
    from segplan.runner.workspace import Workspace
    from tests.test_dicom import write_series
    predictor = Predictor.from_plan(trained_cv, folds=[0], postprocessing=False)
    assert predictor.plan.dataset.orientation == "LPS"
    case = next(c for c in Workspace(trained_cv).dataset.cases if read_volume(c.image_files[0])[0].dtype == np.int16)
    arr, geom = read_volume(case.image_files[0])
    lps = to_sitk(np.clip(arr, -1024, None).astype(np.int16), geom)   # what a DICOM series can store
    inputs = {"LPS": lps, "RAS": _stored(lps, "RAS"), "SAL": _stored(lps, "SAL")}
    write_series(tmp_path / "dicom", sitk.GetArrayFromImage(inputs["RAS"]),
                 spacing=inputs["RAS"].GetSpacing()[::-1], origin=inputs["RAS"].GetOrigin(),
                 direction=inputs["RAS"].GetDirection())
    out = {name: predictor.predict(img) for name, img in inputs.items()}
    out["DICOM"] = predictor.predict(tmp_path / "dicom")
    assert len(np.unique(sitk.GetArrayFromImage(out["LPS"]))) > 2      # not a trivial map
    for name, img in inputs.items():
        assert out[name].GetSize() == img.GetSize() and np.allclose(out[name].GetOrigin(), img.GetOrigin())
        assert np.allclose(out[name].GetDirection(), img.GetDirection())
    assert _world_equal(out["LPS"], out["RAS"]) == 1.0
    assert _world_equal(out["LPS"], out["SAL"]) == 1.0
    assert _world_equal(out["LPS"], out["DICOM"]) >= 0.999
    as_stored = Predictor([dataclasses.replace(s, plan=s.plan.replace(
        dataset=dataclasses.replace(s.plan.dataset, orientation=None))) for s in predictor.stages])
    assert _world_equal(out["LPS"], as_stored.predict(inputs["RAS"])) < 1.0


def test_the_planner_records_the_majority_and_check_dataset_names_the_others(phantoms, tmp_path):
    """Two of the eight phantoms stored RAS: the plan records LPS and says which cases differ, the
    spacings it plans with are of the oriented arrays, and check-dataset warns by name."""
    import shutil
    from segplan.planner.integrity import check_dataset
    from segplan.planner.planning import plan_dataset
    data = tmp_path / "ds"
    shutil.copytree(phantoms, data)
    moved = sorted(p.name.replace("_0000.nii.gz", "") for p in (data / "imagesTr").iterdir())[:2]
    for cid in moved:
        for path in (data / "imagesTr" / f"{cid}_0000.nii.gz", data / "labelsTr" / f"{cid}.nii.gz"):
            sitk.WriteImage(sitk.DICOMOrient(sitk.ReadImage(str(path)), "SAR"), str(path))
    _, problems = check_dataset(data, progress=False)
    (warning,) = [p for p in problems if "stored LPS" in p.message]
    assert warning.severity == "warning" and all(f"{cid} (SAR)" in warning.message for cid in moved)
    plan_dataset(data, tmp_path / "plans" / "p.yaml", progress=False, preset="cpu", time_budget=None, probe=False)
    text = (tmp_path / "plans" / "p.yaml").read_text()
    assert load_plan(tmp_path / "plans" / "p.yaml").dataset.orientation == "LPS"
    assert "6 of the 8 training cases are stored LPS" in text and f"{moved[0]} (SAR)" in text
    # mirroring spares the left-right axis of the arrays the network sees: with 5 of 8 cases stored with
    # left-right along y (each in another orientation, LPS still the majority), the stored directions
    # would have voted y
    mixed = tmp_path / "mixed"
    shutil.copytree(phantoms, mixed)
    cases = sorted(p.name.replace("_0000.nii.gz", "") for p in (mixed / "imagesTr").iterdir())
    for cid, code in zip(cases, ["PLS", "ALS", "ARS", "PRS", "PLI"]):
        for path in (mixed / "imagesTr" / f"{cid}_0000.nii.gz", mixed / "labelsTr" / f"{cid}.nii.gz"):
            sitk.WriteImage(sitk.DICOMOrient(sitk.ReadImage(str(path)), code), str(path))
    plan_dataset(mixed, tmp_path / "plans" / "mixed.yaml", progress=False, preset="cpu", time_budget=None,
                 probe=False)
    lps = load_plan(tmp_path / "plans" / "mixed.yaml")
    assert lps.dataset.orientation == "LPS"
    assert 2 not in lps.training.augmentation.mirror_axes and 1 in lps.training.augmentation.mirror_axes
    # planned with the arrays the network sees: the same spacing and patch as the dataset stored all LPS
    plan_dataset(phantoms, tmp_path / "plans" / "lps.yaml", progress=False, preset="cpu", time_budget=None,
                 probe=False)
    a, b = load_plan(tmp_path / "plans" / "p.yaml"), load_plan(tmp_path / "plans" / "lps.yaml")
    assert a.resampling.target_spacing == b.resampling.target_spacing
    assert a.training.patch_size == b.training.patch_size


def test_preprocessing_with_an_orientation_equals_preprocessing_the_oriented_image(phantoms, tmp_path):
    """A case stored otherwise is preprocessed to the very arrays of its oriented copy, and the
    probabilities put back land on its own grid (the way back is exact); a plan without the key
    preprocesses the image as stored."""
    from segplan.runner.preprocessing.inversion import invert_probabilities
    from segplan.runner.preprocessing.preprocess import label_to_grid, preprocess_image
    from tests.tiny import tiny_plan
    plan = load_plan(tiny_plan(phantoms, tmp_path / "p.yaml"))
    case = sorted((phantoms / "imagesTr").iterdir())[0]
    arr, geom = read_volume(case)
    label, _ = read_volume(phantoms / "labelsTr" / case.name.replace("_0000", ""))
    sitk.WriteImage(sitk.DICOMOrient(to_sitk(arr, geom), "ASR"), str(tmp_path / "asr.nii.gz"))
    arr2, geom2 = read_volume(tmp_path / "asr.nii.gz")
    label2 = np.ascontiguousarray(orient(label, reorientation(geom, "ASR")))
    a = preprocess_image(arr[None].astype(np.float32), geom, plan, "a", label)
    b = preprocess_image(arr2[None].astype(np.float32), geom2, plan, "b", label2)
    np.testing.assert_allclose(a[0], b[0], atol=1e-5)
    assert np.array_equal(a[1], b[1]) and "orientation" in b[2] and "orientation" not in a[2]
    # a label map on the stored grid (a cascade's previous stage) lands where preprocessing put the reference
    assert np.array_equal(label_to_grid(label2, b[2], plan), b[1])
    probs = np.random.default_rng(0).random((4, *b[0].shape[1:])).astype(np.float32)
    back = invert_probabilities(probs, b[2], plan)
    assert back.shape[1:] == tuple(geom2.shape)
    assert np.array_equal(np.argmax(back, 0), orient(np.argmax(invert_probabilities(probs, a[2], plan), 0),
                                                     reorientation(geom, "ASR")))
    plain = plan.replace(dataset=dataclasses.replace(plan.dataset, orientation=None))
    c = preprocess_image(arr2[None].astype(np.float32), geom2, plain, "c", label2)
    assert "orientation" not in c[2]
    assert c[0].shape != a[0].shape or not np.allclose(c[0], a[0])
    assert json.dumps(b[2])   # the properties stay JSON (they are written beside the arrays)
