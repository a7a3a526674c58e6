"""DICOM in, DICOM SEG out (issue 25): series written from phantoms by SimpleITK's series writer with
real tags (shuffled file names and instance numbers, two series in one folder, broken series beside
good ones) are found by UID, ordered by position, read in HU with their geometry, and predicted like
the same image as NIfTI; broken ones are refused by name while the others are predicted; the SEG
read back by highdicom is the NIfTI prediction, references the source instances frame by frame and
passes dicom3tools' dciodvfy; `segplan import dicom` makes a dataset check-dataset accepts."""
from __future__ import annotations

import contextlib
import io
import json
import locale
import os
import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd   # the test extra installs the dicom extra's packages
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from segplan.planner.dataset import Geometry, read_label, read_volume, to_sitk, write_volume, zyx_to_xyz
from segplan.planner.dicom import MissingExtra, dicom_cases, find_series, read_series, require, unique_ids
from segplan.runner.cli import main

# rows run along -y, columns along +x, slices towards +z: a proper rotation that is not the identity, so
# a swapped or flipped axis anywhere shows
ROTATED = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
SPACING = (2.5, 0.75, 1.25)          # (z, y, x), exact in binary: NIfTI's float32 and DICOM's text agree
ORIGIN = (-12.5, 30.25, 100.0)       # (x, y, z) mm


def write_series(folder: Path, hu: np.ndarray, *, patient: str = "PAT1", number: int = 3, seed: int = 0,
                 spacing=SPACING, origin=ORIGIN, direction=ROTATED, edit=None, skip=()) -> str:
    """Write ``hu`` ((z, y, x), whole HU >= -1024) as a CT series with SimpleITK's series writer
    (SimpleITK's DicomSeriesFromArray example): stored as HU + 1024 (Rescale Intercept -1024),
    shuffled file names and instance numbers. ``edit(i, tags)`` changes slice i's tags; slices in
    ``skip`` are not written. Returns the Series Instance UID."""
    from pydicom.uid import generate_uid
    img = sitk.GetImageFromArray(hu.astype(np.float32))
    img.SetSpacing(zyx_to_xyz(spacing))
    img.SetOrigin(origin)
    img.SetDirection(direction)
    uid, study, frame = generate_uid(), generate_uid(), generate_uid()
    d = direction
    common = {"0010|0010": "Phantom^Test", "0010|0020": patient, "0010|0030": "19700101", "0010|0040": "O",
              "0020|000d": study, "0020|000e": uid, "0020|0011": str(number), "0020|0010": "1",
              "0008|0020": "20240101", "0008|0030": "120000", "0008|0050": "A1", "0008|0090": "",
              "0008|0060": "CT", "0008|0070": "segplan tests", "0018|0060": "120", "0018|5100": "HFS",
              "0020|0052": frame, "0020|1040": "", "0020|0012": "1", "0008|0008": "ORIGINAL\\PRIMARY\\AXIAL",
              "0020|0037": "\\".join(str(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
              "0018|0050": str(spacing[0]), "0028|1054": "HU", "0028|1052": "-1024", "0028|1053": "1",
              "0028|0100": "16", "0028|0101": "16", "0028|0102": "15", "0028|0103": "0"}
    rng = np.random.default_rng(seed)
    order = rng.permutation(hu.shape[0])
    names = rng.choice(10**8, size=hu.shape[0], replace=False)
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    saved = locale.setlocale(locale.LC_ALL)   # GDCM's writer leaves the process in the C locale (ASCII text files)
    try:
        for i in range(hu.shape[0]):
            if i in skip:
                continue
            tags = dict(common, **{"0020|0032": "\\".join(map(str, img.TransformIndexToPhysicalPoint((0, 0, i)))),
                                   "0020|0013": str(int(order[i]) + 1), "0008|0018": generate_uid()})
            if edit is not None:
                tags = edit(i, tags)
            part = img[:, :, i]
            for k, v in tags.items():
                part.SetMetaData(k, v)
            writer.SetFileName(str(folder / f"{names[i]:08d}.dcm"))
            writer.Execute(part)
    finally:
        locale.setlocale(locale.LC_ALL, saved)
    return uid


def _volume(shape=(6, 10, 12), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1024, 1500, size=shape).astype(np.int16)


def _geometry(shape) -> Geometry:
    return Geometry(SPACING, ORIGIN, ROTATED, tuple(shape))


def test_series_are_found_by_uid_ordered_by_position_and_read_in_hu_with_their_geometry(tmp_path):
    a, b = _volume(seed=1), _volume((5, 10, 12), seed=2)
    uid_a = write_series(tmp_path / "in", a, number=3, seed=1)
    uid_b = write_series(tmp_path / "in", b, number=4, seed=2)  # a second series in the same folder
    found = {s.uid: s for s in find_series(tmp_path / "in")}
    assert set(found) == {uid_a, uid_b}
    assert {s.series_id for s in found.values()} == {"PAT1_series3", "PAT1_series4"}
    for uid, hu in ((uid_a, a), (uid_b, b)):
        s = found[uid]
        assert s.problem is None and len(s.files) == hu.shape[0]
        assert [p.name for p in s.files] != sorted(p.name for p in s.files)  # names say nothing of the order
        image, geom = read_series(s)
        assert image.shape == (1, *hu.shape) and image.dtype == np.float32
        assert np.array_equal(image[0], hu)                                  # HU, slice order and axes
        assert geom == _geometry(hu.shape)                                   # spacing, origin, direction
        stored = pydicom.dcmread(s.files[0]).pixel_array                     # the raw values are HU + 1024
        assert np.array_equal(stored.astype(np.int32) - 1024, hu[0])


BROKEN = {
    "a missing slice": (dict(skip=(3,)), "uneven slice spacing"),
    "a localizer": (dict(edit=lambda i, t: t | {"0008|0008": "ORIGINAL\\PRIMARY\\LOCALIZER"}), "a localizer"),
    "a single slice": (dict(skip=(1, 2, 3, 4, 5)), "a single slice"),
    "mixed orientations": (dict(edit=lambda i, t: t | ({"0020|0037": "1\\0\\0\\0\\0\\-1"} if i > 2 else {})),
                           "mixed orientations"),
    "several frames of reference": (dict(edit=lambda i, t: t | ({"0020|0052": "1.2.3.4"} if i > 2 else {})),
                                    "2 frames of reference"),
    "a gantry tilt": (dict(edit=lambda i, t: t | {"0020|0032": f"{-12.5 + 0.4 * i}\\30.25\\{100.0 + 2.5 * i}"}),
                      "not stacked along their normal"),
    "two slices at one position": (dict(edit=lambda i, t: t | ({"0020|0032": "-12.5\\30.25\\105.0"} if i == 3 else {})),
                                   "same position"),
}


@pytest.mark.parametrize("kind", BROKEN)
def test_a_broken_series_is_refused_by_name_and_the_other_is_not(tmp_path, kind):
    options, words = BROKEN[kind]
    write_series(tmp_path / "in", _volume(), number=3)
    write_series(tmp_path / "in" / "sub", _volume(), number=9, seed=5, **options)
    series = {s.series_id: s for s in find_series(tmp_path / "in")}
    assert series["PAT1_series3"].problem is None
    assert words in series["PAT1_series9"].problem, series["PAT1_series9"].problem
    with pytest.raises(ValueError, match="series PAT1_series9 .*refused"):
        read_series(series["PAT1_series9"])


def test_ids_are_readable_unique_and_safe_for_file_names(tmp_path):
    write_series(tmp_path / "in" / "b", _volume(), patient="Müller/7 ", number=3, seed=1)
    write_series(tmp_path / "in" / "a", _volume(), patient="Müller/7 ", number=3, seed=2)
    series = find_series(tmp_path / "in")
    assert sorted(s.series_id for s in series) == ["M_ller_7_series3", "M_ller_7_series3_2"]
    assert next(s for s in series if s.series_id == "M_ller_7_series3").folder.name == "a"  # by folder, stably
    assert unique_ids(["x", "x", "x_2", "y"], [(1,), (2,), (3,), (4,)]) == ["x", "x_3", "x_2", "y"]


def test_ids_differing_only_in_case_are_made_unique(tmp_path):
    """Patients 'ab12' and 'AB12' (two people): their outputs must not be one file where file names
    ignore case (macOS, Windows), where the second prediction silently replaced the first."""
    write_series(tmp_path / "in" / "x", _volume(), patient="ab12", number=3, seed=1)
    write_series(tmp_path / "in" / "y", _volume(), patient="AB12", number=3, seed=2)
    ids = [s.series_id for s in find_series(tmp_path / "in")]
    assert len({i.casefold() for i in ids}) == 2, ids
    assert sorted(ids) == ["AB12_series3_2", "ab12_series3"]   # the case kept; the first folder unsuffixed
    assert unique_ids(["a", "A", "A_2"], [(1,), (2,), (3,)]) == ["a", "A_3", "A_2"]


def test_a_missing_extra_says_how_to_install_it_and_nifti_input_does_not_need_it(monkeypatch, tmp_path):
    from segplan.runner.inference.inputs import find_input_cases
    write_volume(_volume(), _geometry(_volume().shape), tmp_path / "nifti" / "a.nii.gz")
    (tmp_path / "nifti" / "README.txt").write_text("not DICOM")
    write_series(tmp_path / "dicom", _volume())
    monkeypatch.setitem(sys.modules, "highdicom", None)
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(MissingExtra, match=r"--output-format dicom-seg needs the Python package highdicom.*"
                                           r"pip install 'segplan\[dicom\]'"):
        require("highdicom", "--output-format dicom-seg")
    assert [c.case_id for c in find_input_cases(tmp_path / "nifti", 1)] == ["a"]
    with pytest.raises(MissingExtra, match=r"reading DICOM series needs the Python package pydicom"):
        find_input_cases(tmp_path / "dicom", 1)


def dciodvfy(path: Path) -> str:
    """dicom3tools' validator on ``path``: fails on any line starting 'Error'; returns its output."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("dciodvfy is missing and CI must not skip: .ci/run installs Debian's dicom3tools")
        pytest.skip("dciodvfy not installed (Debian: apt-get install dicom3tools)")
    run = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    text = run.stdout + run.stderr
    assert "Segmentation" in text, text          # it recognised the object it checked
    errors = [line for line in text.splitlines() if line.startswith("Error")]
    assert not errors, "\n".join(errors)
    return text


def read_seg(path: Path, series_files, labels: dict[str, int]) -> np.ndarray:
    """A SEG read back with highdicom as a label map of the plan's values, frame i for source file i."""
    seg = hd.seg.segread(path)
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in series_files]
    by_number = {int(d.SegmentNumber): labels[d.SegmentLabel] for d in seg.SegmentSequence}
    numbers = seg.get_pixels_by_source_instance(uids, combine_segments=True)
    out = np.zeros(numbers.shape, np.int16)
    for number, value in by_number.items():
        out[numbers == number] = value
    return out


def check_frames(path: Path, series_files) -> None:
    """Each SEG frame references a source instance of the series and lies at its position, in its
    frame of reference."""
    seg = pydicom.dcmread(path)
    src = {d.SOPInstanceUID: d for d in (pydicom.dcmread(f, stop_before_pixels=True) for f in series_files)}
    assert seg.FrameOfReferenceUID == next(iter(src.values())).FrameOfReferenceUID
    for frame in seg.PerFrameFunctionalGroupsSequence:
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        pos = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(pos, [float(v) for v in src[ref].ImagePositionPatient])


def test_seg_round_trips_names_every_class_and_passes_dciodvfy(tmp_path):
    from segplan.runner.inference.dicom_seg import write_seg
    hu = _volume((6, 10, 12))
    write_series(tmp_path / "in", hu)
    (series,) = find_series(tmp_path / "in")
    labels = np.zeros(hu.shape, np.int16)
    labels[1:4, 2:6, 3:9] = 1
    labels[4, 5:8, 0:2] = 3                      # class 2 is absent: still a segment
    names = {"background": 0, "left_lung": 1, "right_lung": 2, "infection": 3}
    write_seg(labels, series, names, tmp_path / "x.dcm", "tiny")
    assert np.array_equal(read_seg(tmp_path / "x.dcm", series.files, names), labels)
    check_frames(tmp_path / "x.dcm", series.files)
    seg = hd.seg.segread(tmp_path / "x.dcm")
    described = {d.SegmentLabel: (d.SegmentedPropertyCategoryCodeSequence[0].CodeMeaning,
                                  d.SegmentedPropertyTypeCodeSequence[0].CodeValue) for d in seg.SegmentSequence}
    assert described == {"left_lung": ("Organ", "44029006"), "right_lung": ("Organ", "3341006"),
                         "infection": ("Tissue", "85756007")}
    dciodvfy(tmp_path / "x.dcm")


def test_seg_says_the_slice_spacing_of_the_positions_not_a_spacing_header_that_disagrees(tmp_path):
    """A source whose Spacing Between Slices (7 mm) disagrees with its positions (2.5 mm apart, what
    segplan reads): the SEG's pixel measures say 2.5 mm, so highdicom reads it back as a volume on
    the series' grid (copied as it is, the header made highdicom refuse: 'not regularly spaced')."""
    from segplan.runner.inference.dicom_seg import write_seg
    hu = _volume((6, 10, 12), seed=4)
    write_series(tmp_path / "in", hu)
    (series,) = find_series(tmp_path / "in")
    for f in series.files:
        ds = pydicom.dcmread(f)
        ds.SpacingBetweenSlices, ds.SliceThickness = "7", "5"   # thick slices overlapping by half: fine
        ds.save_as(f)
    image, geom = read_series(series)
    assert geom.spacing == SPACING
    labels = (image[0] > 500).astype(np.uint8)
    write_seg(labels, series, {"background": 0, "liver": 1}, tmp_path / "x.dcm")
    measures = pydicom.dcmread(tmp_path / "x.dcm").SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert float(measures.SpacingBetweenSlices) == SPACING[0] and float(measures.SliceThickness) == 5
    volume = hd.seg.segread(tmp_path / "x.dcm").get_volume(combine_segments=True)
    assert np.allclose(volume.spacing, SPACING) and int(volume.array.sum()) == int(labels.sum())
    assert np.array_equal(read_seg(tmp_path / "x.dcm", series.files, {"liver": 1}), labels)
    dciodvfy(tmp_path / "x.dcm")


# a sagittal and a coronal acquisition, and an oblique one whose slices are written feet first (the
# slice axis against the normal of the rows and columns: GDCM stacks them the other way round)
ORIENTATIONS = {
    "sagittal": (0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    "coronal": (1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, -1.0, 0.0),
    "oblique, feet first": (0.8660254037844386, 0.0, 0.5, 0.0, 1.0, 0.0, 0.5, 0.0, -0.8660254037844386),
}


@pytest.mark.parametrize("kind", ORIENTATIONS)
def test_other_orientations_are_read_in_place_and_their_seg_frames_lie_on_their_slices(tmp_path, kind):
    """Every voxel read from a non-axial series lies where it was written (compared in physical
    space, whatever order GDCM stacked the slices in), and the SEG of a label map on that grid
    holds it frame by frame on the right source instance."""
    from segplan.runner.inference.dicom_seg import write_seg
    direction = ORIENTATIONS[kind]
    hu = _volume((6, 10, 12), seed=7)
    write_series(tmp_path / "in", hu, direction=direction)
    (series,) = find_series(tmp_path / "in")
    assert series.problem is None
    image, geom = read_series(series)
    feet_first = np.linalg.det(np.reshape(direction, (3, 3))) < 0
    assert np.array_equal(image[0], hu[::-1] if feet_first else hu)   # GDCM stacks along the normal
    written = sitk.GetImageFromArray(hu.astype(np.float32))
    written.SetSpacing(zyx_to_xyz(SPACING))
    written.SetOrigin(ORIGIN)
    written.SetDirection(direction)
    read = to_sitk(image[0], geom)
    assert np.array_equal(sitk.GetArrayFromImage(sitk.Resample(read, written, sitk.Transform(),
                                                               sitk.sitkNearestNeighbor, -5000.0)), hu)
    labels = (image[0] > 300).astype(np.uint8) + (image[0] > 1000)
    names = {"background": 0, "liver": 1, "lesion": 2}
    write_seg(labels, series, names, tmp_path / "x.dcm")
    assert np.array_equal(read_seg(tmp_path / "x.dcm", series.files, names), labels)
    check_frames(tmp_path / "x.dcm", series.files)


def test_a_series_the_reader_cannot_read_is_refused_by_name_and_the_others_are_still_predicted(
        phantoms, tmp_path, monkeypatch, capsys):
    """A header the checks pass but ITK cannot read (Spacing Between Slices 0: 'Refusing to change
    spacing ... to [.., .., 0]') stopped the whole call at that series, leaving the series after it
    unpredicted. The network is replaced by a stand-in (its output is not the point here): every
    readable series is written, the unreadable one is named with ITK's reason, then the call fails."""
    import segplan.runner.inference.predict as rp
    import segplan.runner.inference.stages as stages
    from segplan.planner.dicom import read_case_image
    from segplan.planner.plan_file import load_plan
    from tests.tiny import tiny_plan
    plan = load_plan(tiny_plan(phantoms, tmp_path / "plans" / "p.yaml"))   # a CT plan: the series are CT
    from segplan.runner.inference.inputs import find_input_cases
    from segplan.runner.inference.case import CasePrediction
    for number in (3, 4, 5):
        write_series(tmp_path / "in" / f"s{number}", _volume(seed=number), number=number, seed=number)
    (odd,) = [s for s in find_series(tmp_path / "in") if s.series_id == "PAT1_series4"]
    for f in odd.files:
        ds = pydicom.dcmread(f)
        ds.SpacingBetweenSlices = "0"
        ds.save_as(f)
    cases = find_input_cases(tmp_path / "in", 1)
    assert [c.case_id for c in cases] == ["PAT1_series3", "PAT1_series4", "PAT1_series5"]
    assert all(c.series.problem is None for c in cases)                  # the headers are fine

    def stand_in(case, plan, predict, progress=False, probabilities=False, training_case=False, previous=None,
                 compact=False):
        image, geom = read_case_image(case)
        return CasePrediction((image[0] > 0).astype(np.uint8), geom, None, {}, {"entropy": 0.0})
    monkeypatch.setattr(stages, "engine_predictor", lambda plan, models, weights=None, folds=None: None)
    monkeypatch.setattr(rp, "predict_case", stand_in)
    with pytest.raises(ValueError, match=r"1 DICOM series refused, as said above \(PAT1_series4\); 2 predicted"):
        rp.predict_cases(cases, plan, [], tmp_path / "out", tta=False, progress=False)
    assert "refused series PAT1_series4" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["PAT1_series3.nii.gz", "PAT1_series5.nii.gz",
                                                                   "qc_features.csv"]


def _cli(args) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, err.getvalue()


def test_a_series_without_pixel_spacing_is_refused_by_name(tmp_path):
    """Issue 41: a series whose slices lack Pixel Spacing is refused by name when it is found, not
    left to fail in resampling or in the SEG writer."""
    write_series(tmp_path / "in", _volume(), number=3)
    for f in (tmp_path / "in").iterdir():
        ds = pydicom.dcmread(f)
        del ds.PixelSpacing
        ds.save_as(f)
    (series,) = find_series(tmp_path / "in")
    assert "have no Pixel Spacing (0028,0030)" in series.problem, series.problem
    with pytest.raises(ValueError, match="series PAT1_series3 .*refused.*Pixel Spacing"):
        read_series(series)


def test_a_series_of_another_modality_than_the_plans_channel_is_refused_by_name(phantoms, tmp_path, capsys):
    """Issue 41: an MR series given to a CT plan is refused by name (its values would be read as HU),
    the CT series beside it is admitted; a series without a Modality, or a channel whose name does
    not tell, is let through."""
    from segplan.planner.dicom import expected_modality, modality_problem
    from segplan.planner.plan_file import load_plan
    from segplan.runner.inference.outputs import admit
    from tests.tiny import tiny_plan
    plan = load_plan(tiny_plan(phantoms, tmp_path / "plans" / "p.yaml"))
    assert plan.dataset.channels == ["CT"]
    write_series(tmp_path / "in" / "ct", _volume(), number=3)
    write_series(tmp_path / "in" / "mr", _volume(), number=4, seed=4)
    for f in (tmp_path / "in" / "mr").iterdir():   # (SimpleITK's writer drops the geometry of an MR slice)
        ds = pydicom.dcmread(f)
        ds.Modality = "MR"
        ds.save_as(f)
    cases = dicom_cases(tmp_path / "in", 1, {})
    admitted, skipped = admit(cases, "nifti", plan)
    assert [c.case_id for c in admitted] == ["PAT1_series3"] and [c.case_id for c in skipped] == ["PAT1_series4"]
    err = capsys.readouterr().err
    assert "refused series PAT1_series4" in err and "its Modality is MR, but channel 'CT'" in err, err
    assert expected_modality("FLAIR", "zscore") == "MR" and expected_modality("T1", "zscore") == "MR"
    assert expected_modality("CT", "zscore") == "CT" and expected_modality("channel_0", "zscore") is None
    ct = cases[0].series
    assert "channel 'T2' of plan p takes MR" in modality_problem(ct, "T2", "zscore", "p")
    assert modality_problem(ct, "channel_0", "zscore", "p") is None


@pytest.fixture(scope="module")
def inputs(trained_cv, tmp_path_factory):
    """Two HU phantoms of the tiny plan's dataset (clipped to what the series store, >= -1024 HU) as
    NIfTI files and as DICOM series in one folder, a broken series (a slice missing) beside them, and
    the NIfTI prediction (the reference)."""
    from types import SimpleNamespace

    from segplan.runner.workspace import Workspace
    root = tmp_path_factory.mktemp("dicom_inputs")
    hu = [np.clip(arr, -1024, None) for arr in (read_volume(c.image_files[0])[0]
                                                for c in Workspace(trained_cv).dataset.cases) if arr.dtype == np.int16]
    nifti, dicom = root / "nifti", root / "dicom"
    for number, image in zip((3, 4), hu[:2]):
        write_volume(image, _geometry(image.shape), nifti / f"PAT1_series{number}.nii.gz")
        write_series(dicom / "study", image, number=number, seed=number)           # one folder
    write_series(dicom / "broken", hu[0], number=5, seed=5, skip=(2,))
    assert main(["predict", str(trained_cv), "-i", str(nifti), "-o", str(root / "reference")]) == 0
    reference = {n: read_label(root / "reference" / f"{n}.nii.gz") for n in ("PAT1_series3", "PAT1_series4")}
    assert all(len(np.unique(labels)) > 2 for labels, _ in reference.values())    # lungs found: not a trivial map
    from segplan.planner.plan_file import load_plan
    return SimpleNamespace(plan=trained_cv, root=root, nifti=nifti, dicom=dicom, reference=reference,
                           series={s.series_id: s for s in find_series(dicom)},
                           labels=load_plan(trained_cv).dataset.labels)


def _check_seg_folder(inputs, out: Path) -> None:
    """Each good series' SEG in ``out`` holds the NIfTI prediction, frame by frame on its source
    instances, with one segment per foreground class of the plan, in label order."""
    assert sorted(p.name for p in out.iterdir()) == ["PAT1_series3.dcm", "PAT1_series4.dcm", "qc.csv", "qc_features.csv"]
    for name, (want, _) in inputs.reference.items():
        files = inputs.series[name].files
        assert np.array_equal(read_seg(out / f"{name}.dcm", files, inputs.labels), want), name
        check_frames(out / f"{name}.dcm", files)
        segments = [d.SegmentLabel for d in hd.seg.segread(out / f"{name}.dcm").SegmentSequence]
        assert segments == [n for n, v in sorted(inputs.labels.items(), key=lambda x: x[1]) if v != 0]


@pytest.mark.e2e
def test_dicom_prediction_equals_nifti_prediction_and_a_broken_series_is_refused_by_name(inputs, tmp_path):
    rc, err = _cli(["predict", inputs.plan, "-i", inputs.dicom, "-o", tmp_path])
    assert rc == 2 and "refused series PAT1_series5" in err and "uneven slice spacing" in err, err
    assert "1 DICOM series refused, as said above (PAT1_series5); 2 predicted" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["PAT1_series3.nii.gz", "PAT1_series4.nii.gz", "qc.csv",
                                                          "qc_features.csv"]
    for name, (want, want_geom) in inputs.reference.items():
        got, got_geom = read_label(tmp_path / f"{name}.nii.gz")
        assert np.array_equal(got, want) and got_geom == want_geom, name


@pytest.mark.e2e
def test_dicom_seg_holds_the_prediction_from_a_plan_and_from_a_bundle(inputs, tmp_path):
    rc, err = _cli(["predict", inputs.plan, "-i", inputs.dicom, "-o", tmp_path / "plan",
                    "--output-format", "dicom-seg"])
    assert rc == 2 and "PAT1_series5" in err, err
    _check_seg_folder(inputs, tmp_path / "plan")
    dciodvfy(tmp_path / "plan" / "PAT1_series3.dcm")
    assert main(["export", str(inputs.plan), "-o", str(tmp_path / "m.zip")]) == 0
    rc, err = _cli(["predict", "--model", tmp_path / "m.zip", "-i", inputs.dicom, "-o", tmp_path / "bundle",
                    "--output-format", "dicom-seg"])
    assert rc == 2 and "PAT1_series5" in err, err
    _check_seg_folder(inputs, tmp_path / "bundle")


@pytest.mark.e2e
def test_seg_output_of_nifti_input_and_mixed_inputs_are_refused_by_name(inputs, tmp_path):
    rc, err = _cli(["predict", inputs.plan, "-i", inputs.nifti, "-o", tmp_path / "x", "--output-format", "dicom-seg"])
    assert rc == 2 and "--output-format dicom-seg" in err and "PAT1_series3.nii.gz" in err, err
    assert not list((tmp_path / "x").glob("*")) if (tmp_path / "x").exists() else True
    mixed = tmp_path / "mixed"
    shutil.copytree(inputs.nifti, mixed)
    shutil.copytree(inputs.dicom / "study", mixed / "study")
    rc, err = _cli(["predict", inputs.plan, "-i", mixed, "-o", tmp_path / "y"])
    assert rc == 2 and "may not be mixed" in err and "PAT1_series3.nii.gz" in err and "PAT1_series4" in err, err


def test_import_dicom_builds_a_dataset_check_dataset_accepts(tmp_path):
    dicom, labels = tmp_path / "dicom", tmp_path / "labels"
    hu_a, hu_b = _volume((6, 10, 12), seed=1), _volume((7, 10, 12), seed=2)
    write_series(dicom / "case_a", hu_a, patient="A", number=1, seed=1)
    write_series(dicom / "mixed", hu_b, patient="B", number=2, seed=2)
    write_series(dicom / "mixed", _volume((5, 10, 12)), patient="B", number=3, seed=3)  # no labels: imagesTs
    write_series(dicom / "case_a", _volume((2, 10, 12)), patient="B", number=9, seed=4,   # skipped, named,
                 edit=lambda i, t: t | {"0008|0008": "ORIGINAL\\PRIMARY\\LOCALIZER"})  # not counted in case_a
    lab_a = (hu_a > 500).astype(np.uint8)
    lab_b = (hu_b > 0).astype(np.uint8) * 2
    write_volume(lab_a, _geometry(hu_a.shape), labels / "case_a.nii.gz")       # by the folder's name
    write_volume(lab_b, _geometry(hu_b.shape), labels / "B_series2.nii.gz")    # by the series id
    (labels / "labels.json").write_text(json.dumps({"background": 0, "liver": 1, "lesion": 2}))
    out = tmp_path / "Dataset900_Dicom"
    rc, err = _cli(["import", "dicom", dicom, "--labels", labels, "-o", out])
    assert rc == 0, err
    assert "skipped series B_series9" in err and "a localizer" in err
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "liver": 1, "lesion": 2} and meta["channel_names"] == {"0": "CT"}
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == ["A_series1_0000.nii.gz", "B_series2_0000.nii.gz"]
    assert [p.name for p in (out / "imagesTs").iterdir()] == ["B_series3_0000.nii.gz"]
    image, geom = read_volume(out / "imagesTr" / "A_series1_0000.nii.gz")
    assert np.array_equal(image, hu_a) and geom == _geometry(hu_a.shape)
    assert np.array_equal(read_label(out / "labelsTr" / "B_series2.nii.gz")[0], lab_b)
    assert main(["check-dataset", str(out)]) == 0
    # a label file that matches nothing, or lies off its series' grid, stops the import by name, leaving nothing
    write_volume(lab_a, _geometry(hu_a.shape), labels / "nobody.nii.gz")
    rc, err = _cli(["import", "dicom", dicom, "--labels", labels, "-o", tmp_path / "bad"])
    assert rc == 2 and "nobody.nii.gz: matches no series" in err and "A_series1" in err, err
    (labels / "nobody.nii.gz").unlink()
    write_volume(lab_a[:, :, ::-1].copy(), Geometry((2.5, 0.75, 1.0), ORIGIN, ROTATED, lab_a.shape),
                 labels / "case_a.nii.gz")
    rc, err = _cli(["import", "dicom", dicom, "--labels", labels, "-o", tmp_path / "bad"])
    assert rc == 2 and "case_a.nii.gz: not on the grid of series A_series1" in err and "spacing" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dataset900_Dicom", "dicom", "labels"]
