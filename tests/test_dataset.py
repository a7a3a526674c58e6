import json
import tarfile
import zipfile

import numpy as np
import SimpleITK as sitk
import pytest

from segplan.planner.dataset import DatasetError, Geometry, read_image, read_label, to_sitk, write_volume
from segplan.planner.layouts import load_dataset
from segplan.planner.integrity import check_dataset
from segplan.runner.cli import main

DIRECTION = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)


def _geom(shape, spacing=(3.0, 0.7, 0.9), direction=DIRECTION, origin=(10.5, -20.25, 33.0)):
    return Geometry(tuple(spacing), tuple(origin), tuple(direction), tuple(shape))


def test_geometry_round_trip_anisotropic_noncubic(tmp_path):
    shape = (7, 11, 13)
    arr = np.arange(np.prod(shape), dtype=np.int16).reshape(shape) % 5
    g = _geom(shape)
    write_volume(arr, g, tmp_path / "a.nii.gz")
    back, g2 = read_label(tmp_path / "a.nii.gz")
    assert np.array_equal(back, arr)
    assert g2.shape == shape and np.allclose(g2.spacing, g.spacing)
    assert np.allclose(g2.origin, g.origin) and np.allclose(g2.direction, g.direction)
    img = sitk.ReadImage(str(tmp_path / "a.nii.gz"))
    assert img.GetSize() == (13, 11, 7)  # SimpleITK's x, y, z
    assert np.allclose(img.GetSpacing(), (0.9, 0.7, 3.0))
    # index (z=1, y=2, x=3) is the array element [1, 2, 3]
    assert img.GetPixel(3, 2, 1) == arr[1, 2, 3]


def _write_case(root, cid, img, lbl, g=None, lg=None):
    g = g or _geom(img.shape, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    sitk.WriteImage(to_sitk(img, g), str(root / "imagesTr" / f"{cid}_0000.nii.gz"))
    if lbl is not None:
        sitk.WriteImage(to_sitk(lbl, lg or g), str(root / "labelsTr" / f"{cid}.nii.gz"))


def _poke_nan(path, index):
    import gzip
    raw = bytearray(gzip.decompress(path.read_bytes()))
    offset = int(np.frombuffer(bytes(raw[108:112]), np.float32)[0]) + 4 * index  # vox_offset
    raw[offset:offset + 4] = np.float32(np.nan).tobytes()
    path.write_bytes(gzip.compress(bytes(raw)))


def test_channels_on_other_grids_are_refused_by_name():
    """A case whose channels lie on other voxel grids would be stacked voxel by voxel and misaligned
    (and oriented with channel 0's reorientation): refused, saying which channel."""
    from segplan.planner.dataset import stack_channels
    g = _geom((4, 5, 6))
    vol = np.zeros((4, 5, 6), np.float32)
    assert stack_channels([(vol, g), (vol, Geometry(g.spacing, g.origin, g.direction, g.shape))])[0].shape == (2, 4, 5, 6)
    flipped = Geometry(g.spacing, g.origin, (-1, 0, 0, 0, 1, 0, 0, 0, 1), g.shape)
    with pytest.raises(DatasetError, match="channel 1 lies on another grid than channel 0"):
        stack_channels([(vol, g), (vol, flipped)])


def test_check_dataset_reports_every_problem_at_once(tmp_path):
    root = tmp_path / "ds"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"}, "labels": {"background": 0, "a": 1},
                                                   "numTraining": 9, "file_ending": ".nii.gz"}))
    img = np.random.default_rng(0).normal(size=(6, 8, 10)).astype(np.float32)
    lbl = np.zeros((6, 8, 10), np.uint8)
    lbl[2:4, 2:5, 3:6] = 1
    _write_case(root, "good", img, lbl)
    _write_case(root, "shape", img, lbl[:, :, :9].copy())
    g = _geom(img.shape, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    _write_case(root, "spacing", img, lbl, g, Geometry((3.0, 0.7, 1.3), g.origin, g.direction, g.shape))
    bad = lbl.copy()
    bad[0, 0, 0] = 7
    _write_case(root, "labels", img, bad)
    _write_case(root, "nan", img, lbl)
    _poke_nan(root / "imagesTr" / "nan_0000.nii.gz", 91)  # ITK's writer turns NaN into 0, other tools do not
    _write_case(root, "nolabel", img, None)
    _write_case(root, "empty", img, np.zeros_like(lbl))
    _write_case(root, "trunc", img, lbl)
    data = (root / "imagesTr" / "trunc_0000.nii.gz").read_bytes()
    (root / "imagesTr" / "trunc_0000.nii.gz").write_bytes(data[: len(data) // 2])
    sitk.WriteImage(sitk.GetImageFromArray(img[0]), str(root / "imagesTr" / "flat_0000.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(lbl[0]), str(root / "labelsTr" / "flat.nii.gz"))
    (root / "labelsTr" / "noimage.nii.gz").write_bytes((root / "labelsTr" / "good.nii.gz").read_bytes())
    _, problems = check_dataset(root, progress=False)
    by_case = {}
    for p in problems:
        by_case.setdefault(p.case, []).append(p)
    assert "good" not in by_case
    expect = {"shape": "shape", "spacing": "spacing", "labels": "[7]", "nan": "NaN", "nolabel": "label file missing",
              "empty": "all background", "trunc": "unreadable", "flat": "2D", "noimage": "image file missing"}
    for case, text in expect.items():
        assert case in by_case, f"{case} not reported: {problems}"
        assert any(text in p.message for p in by_case[case]), (case, by_case[case])
        assert all(p.file for p in by_case[case])
    assert [p.severity for p in by_case["empty"]] == ["warning"]
    # the command: exit 1 and a machine-readable report
    assert main(["check-dataset", str(root), "--json", "--workers", "1"]) == 1


def test_check_dataset_spacing_message_says_by_how_much(tmp_path):
    from segplan.planner.integrity import compare_geometry
    a = _geom((2, 3, 4))
    b = Geometry((3.0, 0.7, 1.4), a.origin, a.direction, a.shape)
    msg = " ".join(compare_geometry(a, b))
    assert "spacing" in msg and "0.5" in msg


def test_hippocampus_passes_check(hippocampus):
    ds, problems = check_dataset(hippocampus, workers=2, progress=False)
    assert len(ds.cases) == 260
    assert [p for p in problems if p.severity == "error"] == []


def test_ct_example_plain_layout_infers_labels(ct_example):
    ds = load_dataset(ct_example)
    assert ds.layout == "plain" and len(ds.cases) == 1
    assert len(ds.labels) == 42 and max(ds.labels.values()) == 117 and ds.labels["background"] == 0
    assert ds.channel_names == {0: "CT"}
    image, g = read_image(ds.cases[0])
    assert image.shape == (1, 30, 101, 122) and np.allclose(g.spacing, 3.0)
    assert np.allclose(np.array(g.direction).reshape(3, 3).diagonal(), (-1, -1, 1))


def test_plain_layout_duplicate_and_missing(tmp_path):
    root = tmp_path / "plain"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    img = np.zeros((4, 5, 6), np.int16) - 1000
    img[1:3, 1:4, 1:5] = 40
    lbl = (img > 0).astype(np.uint8)
    g = _geom(img.shape)
    for name in ("a.nii.gz", "a.nrrd", "b.mha"):
        write_volume(img, g, root / "images" / name)
    write_volume(lbl, g, root / "labels" / "a.nii.gz")
    write_volume(lbl, g, root / "labels" / "c.nii.gz")
    ds, problems = check_dataset(root, progress=False)
    msgs = {(p.case, p.message) for p in problems}
    assert ("a", "case id appears 2 times") in msgs
    assert any(c == "b" and "label file missing" in m for c, m in msgs)
    assert any(c == "c" and "image file missing" in m for c, m in msgs)
    assert (root / "dataset.yaml").exists() and ds.labels == {"background": 0, "label_1": 1}


def test_phantoms_are_deterministic_whatever_the_workers(tmp_path):
    from segplan.datasets.phantoms import make_phantoms
    a = make_phantoms(tmp_path / "a", cases=3, seed=5, scale=0.1, workers=1, progress=False)
    b = make_phantoms(tmp_path / "b", cases=3, seed=5, scale=0.1, workers=2, progress=False)
    c = make_phantoms(tmp_path / "c", cases=1, seed=6, scale=0.1, workers=1, progress=False)
    files = sorted(p.relative_to(a) for p in a.rglob("*.nii.gz"))
    assert len(files) == 6
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert (a / files[0]).read_bytes() != (c / files[0]).read_bytes()


def test_phantom_content(phantoms):
    ds = load_dataset(phantoms)
    info = json.loads((phantoms / "phantoms.json").read_text())
    assert {i["windowed"] for i in info} == {True, False}
    for case, meta in zip(ds.cases, info):
        img, _ = read_image(case)
        lbl, _ = read_label(case.label_file)
        assert set(np.unique(lbl)) <= {0, 1, 2, 3} and {1, 2, 3} <= set(np.unique(lbl))
        if meta["windowed"]:
            assert img.min() >= 0 and img.max() <= 255
        else:
            lung = img[0][lbl == 1]
            assert -950 < np.median(lung) < -750
        # label 1 (left lung) lies at larger x than label 2: +x is the patient's left
        assert np.argwhere(lbl == 1)[:, 2].mean() > np.argwhere(lbl == 2)[:, 2].mean()


def test_import_covid19_ct_seg_from_small_archives(tmp_path, phantoms):
    names = ["coronacases_001", "radiopaedia_4_85506_1"]
    src = sorted((phantoms / "imagesTr").iterdir())[:2]
    lbl = sorted((phantoms / "labelsTr").iterdir())[:2]
    with zipfile.ZipFile(tmp_path / "COVID-19-CT-Seg_20cases.zip", "w") as z:
        for n, p in zip(names, src):
            z.write(p, f"{n}.nii.gz")
    with zipfile.ZipFile(tmp_path / "Lung_and_Infection_Mask.zip", "w") as z:
        for n, p in zip(names, lbl):
            z.write(p, f"{n}.nii.gz")
    out = tmp_path / "Dataset100_COVID"
    assert main(["import", "covid19-ct-seg", str(tmp_path / "COVID-19-CT-Seg_20cases.zip"),
                 str(tmp_path / "Lung_and_Infection_Mask.zip"), "-o", str(out)]) == 0
    ds = load_dataset(out)
    assert [c.case_id for c in ds.cases] == sorted(names)
    assert ds.labels == {"background": 0, "left_lung": 1, "right_lung": 2, "infection": 3}
    assert check_dataset(out, progress=False)[1] == []


def test_import_msd_tar_splits_4d_images(tmp_path):
    task = tmp_path / "Task09_Tiny"
    (task / "imagesTr").mkdir(parents=True)
    (task / "labelsTr").mkdir()
    (task / "imagesTs").mkdir()
    rng = np.random.default_rng(1)
    vol4 = sitk.JoinSeries([sitk.GetImageFromArray(rng.normal(size=(4, 5, 6)).astype(np.float32)) for _ in range(2)])
    for cid in ("tiny_001", "tiny_002"):
        sitk.WriteImage(vol4, str(task / "imagesTr" / f"{cid}.nii.gz"))
        lab = np.zeros((4, 5, 6), np.uint8)
        lab[1:3, 1:3, 1:3] = 2
        sitk.WriteImage(sitk.GetImageFromArray(lab), str(task / "labelsTr" / f"{cid}.nii.gz"))
    sitk.WriteImage(vol4, str(task / "imagesTs" / "tiny_003.nii.gz"))
    (task / "imagesTr" / "._tiny_001.nii.gz").write_bytes(b"mac junk")
    (task / "dataset.json").write_text(json.dumps({
        "name": "Tiny", "modality": {"0": "FLAIR", "1": "T1w"}, "labels": {"0": "background", "2": "tumour"},
        "numTraining": 2, "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"}
                                       for c in ("tiny_001", "tiny_002")], "test": ["./imagesTs/tiny_003.nii.gz"]}))
    with tarfile.open(tmp_path / "Task09_Tiny.tar", "w") as tf:
        tf.add(task, arcname="Task09_Tiny")
    out = tmp_path / "Dataset009_Tiny"
    assert main(["import", "msd", str(tmp_path / "Task09_Tiny.tar"), "-o", str(out)]) == 0
    ds = load_dataset(out)
    assert ds.channel_names == {0: "FLAIR", 1: "T1w"} and ds.labels == {"background": 0, "tumour": 2}
    assert len(ds.cases) == 2 and len(ds.test_cases) == 1
    img, _ = read_image(ds.cases[0])
    assert img.shape == (2, 4, 5, 6)
    assert check_dataset(out, progress=False)[1] == []
