"""Every image format the README promises goes through a whole fold: plan, run (train, predict and
evaluate the validation cases), evaluate, summarize, postprocess and predict, on a plain
images/ + labels/ folder of tiny phantoms stored in that format, with a rotated direction and an
origin away from zero so a lost geometry shows."""
from pathlib import Path

import numpy as np
import pytest
import yaml

from segplan.planner.fileio import image_files
from segplan.runner.cli import main
from segplan.runner.workspace import Workspace
from tests.tiny import tiny_plan

pytest.importorskip("keras")
sitk = pytest.importorskip("SimpleITK")

DIRECTION = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)   # x and y swapped, one of them flipped
ORIGIN = (-41.5, 17.25, 203.0)
CASES = 4


def _plain_copy(phantoms: Path, out: Path, ending: str) -> Path:
    """The first CASES phantoms as images/<case><ending> + labels/<case><ending>, re-oriented."""
    for sub in ("images", "labels"):
        (out / sub).mkdir(parents=True)
    for cid, lbl in list(image_files(phantoms / "labelsTr").items())[:CASES]:
        for src, dst in ((phantoms / "imagesTr" / f"{cid}_0000.nii.gz", out / "images"), (lbl, out / "labels")):
            img = sitk.ReadImage(str(src))
            img.SetDirection(DIRECTION)
            img.SetOrigin(ORIGIN)
            sitk.WriteImage(img, str(dst / f"{cid}{ending}"), True)
    return out


def _geometry(path: Path) -> tuple:
    img = sitk.ReadImage(str(path))
    return img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection()


@pytest.mark.e2e
@pytest.mark.parametrize("ending", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_every_format_goes_through_a_whole_fold(phantoms, tmp_path, ending):
    data = _plain_copy(phantoms, tmp_path / "data", ending)
    plan_path = tiny_plan(data, tmp_path / "plans" / "fmt.yaml", epochs=1, iterations=1, folds=2,
                          validation_patches=0)   # training is not what differs between formats: one step
    ws = Workspace(plan_path)
    fold = ws.fold(0)

    assert main(["run", str(plan_path), "--fold", "0"]) == 0
    refs = image_files(fold.validation_reference)
    assert refs and all(p.name.endswith(ending) for p in refs.values())
    val = yaml.safe_load(fold.validation_summary.read_text())
    assert val["cases"] == len(refs) and val["missing_predictions"] == []
    for cid, ref in refs.items():  # each validation prediction lies on its reference's grid
        pred_geom, ref_geom = _geometry(fold.validation / f"{cid}.nii.gz"), _geometry(ref)
        for a, b in zip(pred_geom, ref_geom):
            assert np.allclose(a, b)

    assert main(["evaluate", "--pred", str(fold.validation), "--ref", str(fold.validation_reference),
                 "--plan", str(plan_path), "--hd95"]) == 0
    ev = yaml.safe_load(fold.validation_summary.read_text())
    for name in ("label_1", "label_2", "label_3"):
        entry = ev["classes"][name]
        assert 0.0 <= entry["dice"]["mean"] <= 1.0
        assert "hd95_mm" in entry and "hd95_diag_mm" in entry and entry["hd95_diag_mm"]["mean"] is not None

    assert main(["summarize", str(plan_path)]) == 0
    cv = yaml.safe_load(ws.cv_summary_yaml.read_text())
    assert set(cv["folds"]) == {"fold 0", "average"} and cv["missing_folds"] == [1]
    assert main(["postprocess", str(plan_path)]) == 0
    assert yaml.safe_load(ws.postprocessing.read_text())["folds"] == [0]

    cid = next(iter(refs))
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / f"{cid}{ending}").symlink_to(data / "images" / f"{cid}{ending}")
    assert main(["predict", str(plan_path), "-i", str(inp), "-o", str(tmp_path / "out")]) == 0
    pred = tmp_path / "out" / f"{cid}.nii.gz"
    for a, b in zip(_geometry(pred), _geometry(inp / f"{cid}{ending}")):
        assert np.allclose(a, b)
    assert np.allclose(_geometry(pred)[3], DIRECTION) and np.allclose(_geometry(pred)[2], ORIGIN)


def test_references_are_linked_under_their_own_format(tmp_path):
    """The validation references keep their ending (SimpleITK picks the reader by it), a MetaImage
    header brings its data file, and an older run's link under another ending is replaced."""
    from segplan.planner.dataset import Case, Geometry, read_label, write_volume
    from segplan.runner.pipeline import link_references
    g = Geometry((2.0, 1.0, 0.5), ORIGIN, DIRECTION, (3, 4, 5))
    lab = np.arange(60, dtype=np.uint8).reshape(3, 4, 5) % 3
    src = tmp_path / "labels"
    cases = []
    for cid, ending in (("a", ".nrrd"), ("b", ".mha"), ("c", ".nii")):
        write_volume(lab, g, src / f"{cid}{ending}")
        cases.append(Case(cid, (), src / f"{cid}{ending}"))
    sitk.WriteImage(sitk.ReadImage(str(src / "a.nrrd")), str(src / "d.mhd"))   # header + d.zraw or d.raw
    cases.append(Case("d", (), src / "d.mhd"))
    ref = tmp_path / "validation" / "reference"
    ref.mkdir(parents=True)
    (ref / "a.nii.gz").symlink_to(src / "a.nrrd")                               # what the old code made
    link_references(cases, ref)
    link_references(cases, ref)                                                  # a second run changes nothing
    files = image_files(ref)
    assert {p.name for p in files.values()} == {"a.nrrd", "b.mha", "c.nii", "d.mhd"}
    for p in files.values():
        arr, geom = read_label(p)
        assert np.array_equal(arr, lab) and np.allclose(geom.spacing, g.spacing) and np.allclose(geom.origin, ORIGIN)


def test_compressed_npz_reads_back_with_np_load_and_is_deflated(tmp_path):
    """Probabilities are written deflated at level 1 (6x faster than np.savez_compressed's level on
    a CT's 630 MB): any np.load reads them back, values and dtypes exact, several arrays, nothing
    left beside the file."""
    import zipfile
    from segplan.planner.fileio import save_npz
    rng = np.random.default_rng(0)
    arrays = {"probabilities": rng.random((3, 4, 5, 6)).astype(np.float16), "index": np.arange(7, dtype=np.int32)}
    path = tmp_path / "case.npz"
    save_npz(path, compressed=True, **arrays)
    with np.load(path, allow_pickle=False) as z:
        assert set(z.files) == set(arrays)
        for name, a in arrays.items():
            assert z[name].dtype == a.dtype and np.array_equal(z[name], a)
    with zipfile.ZipFile(path) as z:
        assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in z.infolist())
    assert [p.name for p in tmp_path.iterdir()] == ["case.npz"]
