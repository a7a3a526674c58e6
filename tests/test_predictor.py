"""segplan from Python (issue 39): ``Predictor`` loads the networks once and gives, for a file or a
SimpleITK image, the voxels and geometry `segplan predict` writes; and `segplan predict` refuses an
output folder that would overwrite its inputs, before any work."""
from __future__ import annotations

import contextlib
import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from segplan.planner.dataset import Case, DatasetError
from segplan.runner.cli import main
from segplan.runner.inference.inputs import refuse_overwrite
from tests.tiny import first_case_input


def _same_image(a: sitk.Image, b: sitk.Image) -> None:
    """Same voxels; same grid (a NIfTI file stores spacing and origin as float32)."""
    assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    assert a.GetSize() == b.GetSize()
    for get in ("GetSpacing", "GetOrigin", "GetDirection"):
        assert np.allclose(getattr(a, get)(), getattr(b, get)(), atol=1e-4), get


@pytest.fixture(scope="module")
def reference(trained_cv, tmp_path_factory):
    """One case as `segplan predict` writes it, from the plan and from its bundle."""
    root = tmp_path_factory.mktemp("predictor")
    inp = root / "in"
    image = first_case_input(trained_cv, inp)
    assert main(["predict", str(trained_cv), "-i", str(inp), "-o", str(root / "out")]) == 0
    bundle = root / "cv.zip"
    assert main(["export", str(trained_cv), "-o", str(bundle)]) == 0
    assert main(["predict", "--model", str(bundle), "-i", str(inp), "-o", str(root / "out_bundle"), "--no-tta"]) == 0
    case_id = image.name.split(".")[0].removesuffix("_0000")
    return inp / image.name, root / "out" / f"{case_id}.nii.gz", bundle, root / "out_bundle" / f"{case_id}.nii.gz"


def test_predictor_gives_what_segplan_predict_writes_for_a_file_an_image_and_a_channel_list(
        trained_cv, reference, monkeypatch):
    from segplan import Predictor
    from segplan.runner.inference import models
    image_file, written, _, _ = reference
    built = []
    real = models.build_models
    monkeypatch.setattr(models, "build_models", lambda *a, **k: built.append(1) or real(*a, **k))
    predictor = Predictor.from_plan(trained_cv)
    assert built == [1]                                   # every fold's network, built once
    image = sitk.ReadImage(str(image_file))
    outputs = [predictor.predict(image_file), predictor.predict(str(image_file)), predictor.predict(image),
               predictor.predict([image])]
    assert built == [1]                                   # ... and not again for each image
    expected = sitk.ReadImage(str(written))
    for out in outputs:
        _same_image(out, expected)
        assert out.GetSize() == image.GetSize() and np.allclose(out.GetOrigin(), image.GetOrigin())
    labels, probs = predictor.predict(image, probabilities=True)
    assert np.array_equal(sitk.GetArrayFromImage(labels), sitk.GetArrayFromImage(expected))
    assert probs.shape == (len(predictor.labels), *sitk.GetArrayFromImage(image).shape)
    with pytest.raises(DatasetError, match="2 channels, the plan needs 1"):
        predictor.predict([image, image])


def test_an_ensemble_of_one_stage_twice_is_that_stage(trained_cv, reference, capsys):
    """Each stage of an ensemble (and of a cascade) preprocesses an image of its own: preprocessing
    works in place, and a second member once predicted from the first one's normalised values
    (probabilities off by up to 0.29, and a false 'no known unit' warning for the CT)."""
    from segplan import Predictor
    image_file = reference[0]
    one = Predictor.from_plan(trained_cv)
    assert one.plan.dataset.channels and one.plan.dataset.channels[0].lower() == "ct"
    twice = Predictor(one.stages * 2, one.post)
    capsys.readouterr()
    a, pa = one.predict(image_file, probabilities=True)
    b, pb = twice.predict(sitk.ReadImage(str(image_file)), probabilities=True)
    assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    assert np.allclose(pa, pb, atol=1e-6)
    assert "no known unit" not in capsys.readouterr().err


def test_predictor_from_a_bundle_gives_what_predict_model_writes(reference):
    from segplan import Predictor
    image_file, _, bundle, written = reference
    _same_image(Predictor.from_bundle(bundle, tta=False).predict(image_file), sitk.ReadImage(str(written)))


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_predict_refuses_to_write_into_its_input_folder_before_any_work(trained_cv, tmp_path, monkeypatch):
    """`segplan predict -i X -o X` once replaced each CT by its label map without a word."""
    from segplan.runner.inference.predictor import Predictor
    inp = tmp_path / "in"
    first_case_input(trained_cv, inp)
    (tmp_path / "link").symlink_to(inp)
    before = _digest(inp)

    def no_work(*a, **k):
        raise AssertionError("the networks were loaded before the output folder was checked")
    monkeypatch.setattr(Predictor, "from_plan", no_work)
    for out in (inp, tmp_path / "link"):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main(["predict", str(trained_cv), "-i", str(inp), "-o", str(out)])
        lines = err.getvalue().strip().splitlines()
        assert rc != 0 and len(lines) == 1 and lines[0].startswith("segplan: error:"), lines
        assert str(out) in lines[0] and "input folder" in lines[0]
    assert _digest(inp) == before


def test_an_output_that_would_replace_an_input_file_is_refused_by_name(tmp_path):
    """Input files found below the input folder (DICOM series in subfolders) sit in another folder
    than -i: an -o there whose prediction names clash with them is refused."""
    series = tmp_path / "in" / "s1"
    series.mkdir(parents=True)
    (series / "p1.dcm").write_bytes(b"")
    cases = [Case("p1", (series / "p1.dcm",), None)]
    with pytest.raises(DatasetError, match=r"case p1 would replace the input .*s1/p1\.dcm"):
        refuse_overwrite(tmp_path / "in", series, cases)
    refuse_overwrite(tmp_path / "in", tmp_path / "out", cases)   # elsewhere: fine


def test_the_python_api_page_calls_only_what_predictor_has():
    """docs/python-api.md's code blocks parse, and each ``Predictor.x(...)`` / ``predictor.x(...)``
    they show names a method or property Predictor has, with keywords its signature takes."""
    import ast
    import inspect
    import re

    from segplan import Predictor
    page = (Path(__file__).resolve().parents[1] / "docs" / "python-api.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", page, flags=re.S | re.M)
    assert len(blocks) >= 4
    seen = set()
    for block in blocks:
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                    node.value.id in ("Predictor", "predictor"):
                assert hasattr(Predictor, node.attr), node.attr
                seen.add(node.attr)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    isinstance(node.func.value, ast.Name) and node.func.value.id in ("Predictor", "predictor"):
                params = inspect.signature(getattr(Predictor, node.func.attr)).parameters
                assert all(k.arg in params for k in node.keywords), (node.func.attr, [k.arg for k in node.keywords])
    assert {"from_plan", "from_bundle", "from_selection", "predict", "predict_folder", "labels"} <= seen
