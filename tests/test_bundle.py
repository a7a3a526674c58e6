"""A model bundle (issue 13): exported from the work folder, it predicts on a machine with neither
the dataset nor the work folder exactly what the work folder predicts; a changed file, a missing
fold, an unknown version, an unfinished fold or the wrong channel count is refused by name."""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import shutil
import tempfile
import types
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from segplan.planner.dataset import read_label
from segplan.runner.cli import main
from segplan.runner.workspace import Workspace
from tests.tiny import first_case_input, tiny_plan


def _rezip(src, dst, change: dict):
    """Copy a zip, replacing (bytes) or dropping (None) the named members."""
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(dst, "w") as b:
        for name in a.namelist():
            if name in change:
                if change[name] is not None:
                    b.writestr(name, change[name])
            else:
                b.writestr(name, a.read(name))


@pytest.mark.e2e
def test_bundle_predicts_like_the_work_folder_and_refuses_what_it_cannot_trust(exported, tmp_path):
    """The module's two-fold plan (trained once, in ``exported``): export refuses while a fold is
    unfinished; the bundle holds no training case ids, predicts what the work folder predicts once
    the work folder and plan are gone, and refuses files changed after export."""
    plan_path, bundle = exported.plan, exported.bundle
    done = Workspace(plan_path).fold(1).finished
    held = done.with_suffix(".held")
    done.rename(held)
    try:
        with pytest.raises(ValueError, match=r"folds \[1\] have not finished"):
            from segplan.runner.inference.bundle import export
            export(plan_path, tmp_path / "m.zip")
    finally:
        held.rename(done)
    names = zipfile.ZipFile(bundle).namelist()
    assert {"manifest.json", "folds/0/plan.yaml", "folds/1/model.weights.h5", "postprocessing.yaml"} <= set(names)
    # no training case ids: the training cases' units mean nothing to new images (issue 19)
    import yaml
    training_ids = {c.case_id for c in Workspace(plan_path).dataset.cases}
    for k in (0, 1):
        text = zipfile.ZipFile(bundle).read(f"folds/{k}/plan.yaml").decode()
        assert yaml.safe_load(text)["intensity"]["conventions"] == {}
        assert not [cid for cid in training_ids if cid in text]
    # input cases on "another machine": no dataset, no work folder
    case = Workspace(plan_path).dataset.cases[0]
    image = case.image_files[0].resolve()
    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copy(image, inp / image.name)
    assert main(["predict", str(plan_path), "-i", str(inp), "-o", str(tmp_path / "from_work")]) == 0
    # the network alone, for serving stacks: the SavedModel computes what Keras computes
    assert main(["export", str(plan_path), "-o", str(tmp_path / "served"), "--format", "savedmodel",
                 "--folds", "0"]) == 0
    import tensorflow as tf
    from segplan.runner.inference.models import load_fold_models
    _, (model,) = load_fold_models(Workspace(plan_path), [0])
    x = np.random.default_rng(0).normal(size=(1, 8, 32, 32, 1)).astype(np.float32)
    served = tf.saved_model.load(str(tmp_path / "served" / "fold_0"))
    assert np.allclose(np.asarray(served.serve(x)), model.predict_on_batch(x), atol=1e-5)
    meta = json.loads((tmp_path / "served" / "fold_0" / "assets.extra" / "segplan.json").read_text())
    lm = Workspace(plan_path).plan.dataset
    assert meta["segplan.output"] == "softmax" and json.loads(meta["segplan.output_channels"]) == list(lm.labels)
    assert json.loads(meta["segplan.labels"]) == lm.labels and json.loads(meta["segplan.regions"]) == {}
    assert json.loads(meta["segplan.orientation"]) == lm.orientation == "LPS"
    plans, away = Path(plan_path).parent, tmp_path / "plans_away"
    shutil.move(plans, away)                                # the work folder and plan are gone
    try:
        assert main(["predict", "--model", str(bundle), "-i", str(inp), "-o", str(tmp_path / "from_bundle")]) == 0
    finally:
        shutil.move(away, plans)                            # back, for the module's other tests
    a = read_label(tmp_path / "from_work" / f"{case.case_id}.nii.gz")[0]
    b = read_label(tmp_path / "from_bundle" / f"{case.case_id}.nii.gz")[0]
    assert np.array_equal(a, b)
    # refused: a changed file, a missing fold file, an unknown version, the wrong channel count
    from segplan.runner.inference.bundle import BundleError, open_bundle
    plan_text = zipfile.ZipFile(bundle).read("folds/0/plan.yaml").replace(b"overlap: 0.5", b"overlap: 0.25")
    manifest = json.loads(zipfile.ZipFile(bundle).read("manifest.json"))
    cases = [({"folds/0/plan.yaml": plan_text}, "folds/0/plan.yaml was changed after export"),
             ({"folds/1/model.weights.h5": None}, "folds/1/model.weights.h5 is listed in the manifest but missing"),
             ({"manifest.json": json.dumps({**manifest, "bundle_version": 99})}, "bundle version 99 is unknown")]
    for i, (change, message) in enumerate(cases):
        bad = tmp_path / f"bad{i}.zip"
        _rezip(bundle, bad, change)
        with pytest.raises(BundleError, match=message):
            open_bundle(bad, tmp_path / f"x{i}")
        assert main(["predict", "--model", str(bad), "-i", str(inp), "-o", str(tmp_path / f"o{i}")]) == 2
    two = tmp_path / "two"
    two.mkdir()
    img = sitk.ReadImage(str(image))
    sitk.WriteImage(img, str(two / "x_0000.nii.gz"))
    sitk.WriteImage(img, str(two / "x_0001.nii.gz"))
    assert main(["predict", "--model", str(bundle), "-i", str(two), "-o", str(tmp_path / "o2")]) == 2


# --- hostile and malformed bundles (issue 20): refused by name, never a traceback, nothing unpacked
# before every size and hash is checked; `predict --model` honours every flag of `predict PLAN`.

PREDICT_FLAG_CASES = [[], ["--folds", "0", "--save-probabilities"],
                      ["--folds", "1", "--no-tta", "--save-probabilities"],
                      ["--no-postprocessing", "--no-tta", "--save-probabilities"]]


@pytest.fixture(scope="module")
def exported(phantoms, tmp_path_factory):
    """A two-fold tiny plan, trained once, its bundle, and an input folder of one case. Mirroring is
    switched on for inference after training so that --no-tta changes the result."""
    import dataclasses

    from segplan.planner.plan_file import load_plan, save_plan
    root = tmp_path_factory.mktemp("exported")
    plan_path = tiny_plan(phantoms, root / "plans" / "p.yaml", epochs=1, iterations=2)
    for k in (0, 1):
        assert main(["run", str(plan_path), "--fold", str(k)]) == 0
    assert main(["summarize", str(plan_path)]) == 0
    plan = load_plan(plan_path)
    save_plan(plan.replace(inference=dataclasses.replace(plan.inference, mirroring=True)), plan_path)
    bundle = root / "m.zip"
    assert main(["export", str(plan_path), "-o", str(bundle)]) == 0
    inp = root / "in"
    first_case_input(plan_path, inp)
    return types.SimpleNamespace(root=root, plan=plan_path, bundle=bundle, inp=inp, phantoms=phantoms)


@pytest.fixture(scope="module")
def plan_prediction(exported):
    """`segplan predict PLAN FLAGS` run once per distinct FLAGS (the reference a bundle must match)."""
    done: dict[tuple, Path] = {}

    def predict(flags: tuple) -> Path:
        if flags not in done:
            out = exported.root / f"ref{len(done)}"
            assert main(["predict", str(exported.plan), "-i", str(exported.inp), "-o", str(out), *flags]) == 0
            done[flags] = out
        return done[flags]
    return predict


def _cli(args: list[str]) -> tuple[int, str]:
    """main() in-process, with what it wrote to stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, err.getvalue()


def _assert_refused(bundle, args: list, out: Path) -> str:
    """Exit code 2, exactly one `segplan: error:` line naming the bundle, and no output written."""
    rc, err = _cli(args)
    lines = err.splitlines()
    assert rc == 2 and len(lines) == 1, (rc, err)
    assert lines[0].startswith("segplan: error: ") and str(bundle) in lines[0], lines[0]
    assert not out.exists()
    return lines[0]


def _refused_predict(bundle, inp, out: Path, *flags) -> str:
    return _assert_refused(bundle, ["predict", "--model", bundle, "-i", inp, "-o", out, *flags], out)


def _same_outputs(a: Path, b: Path) -> None:
    """The same files, the same label maps and probabilities, bit for bit."""
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for p in a.iterdir():
        if p.name.endswith(".nii.gz"):
            assert np.array_equal(read_label(p)[0], read_label(b / p.name)[0]), p.name
        elif p.suffix == ".npz":
            with np.load(p) as x, np.load(b / p.name) as y:
                assert np.array_equal(x["probabilities"], y["probabilities"]), p.name
        elif p.suffix == ".csv":   # the quality check: the same scores, flags and reasons
            assert p.read_text() == (b / p.name).read_text(), p.name


def _entries(bundle) -> list[tuple[zipfile.ZipInfo, bytes]]:
    with zipfile.ZipFile(bundle) as z:
        return [(i, z.read(i)) for i in z.infolist()]


def _write(dst, entries, tweak=None) -> Path:
    """A zip of (name or ZipInfo, bytes) entries (deflated); ``tweak(name, info)`` may edit an entry's
    central-directory record (what ZipInfo exposes to a reader) after its data is written."""
    with warnings.catch_warnings(), zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as z:
        warnings.simplefilter("ignore")  # "Duplicate name": duplicates are made on purpose
        for entry, data in entries:
            name = entry.filename if isinstance(entry, zipfile.ZipInfo) else entry
            info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, data)
            if tweak is not None:
                tweak(name, info)
    return Path(dst)


def _manifest_of(bundle) -> dict:
    return json.loads(zipfile.ZipFile(bundle).read("manifest.json"))


def _with_manifest(bundle, dst, manifest, extra=(), replace=None) -> Path:
    """The bundle's members (``replace``: name -> new bytes) with another manifest (any JSON value,
    or bytes taken as they are), plus ``extra`` entries."""
    replace = replace or {}
    body = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
    entries = [(i.filename, replace.get(i.filename, d)) for i, d in _entries(bundle) if i.filename != "manifest.json"]
    return _write(dst, entries + list(extra) + [("manifest.json", body)])


def _rehashed(bundle, dst, replace: dict) -> Path:
    """Members replaced AND the manifest's hashes updated to match: what anyone can write."""
    m = _manifest_of(bundle)
    files = {**m["files"], **{n: hashlib.sha256(d).hexdigest() for n, d in replace.items()}}
    return _with_manifest(bundle, dst, {**m, "files": files}, replace=replace)


def _malformed(name: str, b: Path, dst: Path) -> Path:
    """The malformed bundles of issue 20, each made from the good bundle ``b``."""
    m = _manifest_of(b)
    plan0 = zipfile.ZipFile(b).read("folds/0/plan.yaml")
    empty = hashlib.sha256(b"").hexdigest()
    cases = {
        "empty folds": lambda: _with_manifest(b, dst, {**m, "folds": []}),
        "folds null": lambda: _with_manifest(b, dst, {**m, "folds": None}),
        "folds as text": lambda: _with_manifest(b, dst, {**m, "folds": "0,1"}),
        "fold as text": lambda: _with_manifest(b, dst, {**m, "folds": ["0", 1]}),
        "duplicate folds": lambda: _with_manifest(b, dst, {**m, "folds": [0, 0, 0, 1]}),
        "manifest a list": lambda: _with_manifest(b, dst, [m]),
        "manifest not JSON": lambda: _with_manifest(b, dst, b"{folds: [0]"),
        "version true": lambda: _with_manifest(b, dst, {**m, "bundle_version": True}),
        "version 1.0": lambda: _with_manifest(b, dst, {**m, "bundle_version": 1.0}),
        "version text": lambda: _with_manifest(b, dst, {**m, "bundle_version": "1"}),
        "no files": lambda: _with_manifest(b, dst, {k: v for k, v in m.items() if k != "files"}),
        "files a list": lambda: _with_manifest(b, dst, {**m, "files": list(m["files"])}),
        "digest not hex": lambda: _with_manifest(b, dst, {**m, "files": {**m["files"], "cv_summary.yaml": 7}}),
        "folder listed": lambda: _with_manifest(b, dst, {**m, "files": {**m["files"], "folds/0/": empty}},
                                                extra=[("folds/0/", b"")]),
        "parent of a listed file": lambda: _with_manifest(b, dst, {**m, "files": {**m["files"], "folds/0": empty}},
                                                          extra=[("folds/0", b"")]),
        "unsafe name": lambda: _with_manifest(b, dst, {**m, "files": {**m["files"], "../x.yaml": empty}},
                                              extra=[("../x.yaml", b"")]),
        "member twice": lambda: _write(dst, _entries(b) + [("folds/0/plan.yaml", plan0)]),
        "encrypted member": lambda: _write(dst, _entries(b), lambda n, i: setattr(i, "flag_bits", i.flag_bits | 1)
                                           if n == "folds/0/model.weights.h5" else None),
        "unsupported compression": lambda: _write(dst, _entries(b), lambda n, i: setattr(i, "compress_type", 99)
                                                  if n == "folds/0/plan.yaml" else None),
        "bzip2 member": lambda: _write(dst, _entries(b), lambda n, i: setattr(i, "compress_type", zipfile.ZIP_BZIP2)
                                       if n == "folds/1/plan.yaml" else None),
        "corrupt member": lambda: _write(dst, _entries(b), lambda n, i: setattr(i, "CRC", i.CRC ^ 1)
                                         if n == "cv_summary.yaml" else None),
        "folder": lambda: (dst.mkdir(), dst)[1],
        "not a zip": lambda: (dst.write_text("hello"), dst)[1],
        "garbage plan, rehashed": lambda: _rehashed(b, dst, {"folds/0/plan.yaml": b"network: [1, 2\n"}),
        "binary plan, rehashed": lambda: _rehashed(b, dst, {"folds/1/plan.yaml": b"\xff\xfe\x00plan"}),
        "invalid plan, rehashed": lambda: _rehashed(b, dst, {"folds/0/plan.yaml": plan0.replace(
            b"overlap: 0.5", b"overlap: 7")}),
        "weights of another network, rehashed": lambda: _rehashed(b, dst, {"folds/0/plan.yaml": plan0.replace(
            b"filters: [4, 8, 16]", b"filters: [4, 8, 24]")}),
        "garbage weights, rehashed": lambda: _rehashed(b, dst, {"folds/1/model.weights.h5": b"not hdf5"}),
    }
    return cases[name]()


MALFORMED = {  # case -> what the one error line must say
    "empty folds": "folds must be a non-empty list", "folds null": "folds must be a non-empty list",
    "folds as text": "folds must be a non-empty list", "fold as text": "folds must be a non-empty list",
    "duplicate folds": "fold 0 more than once", "manifest a list": "must be a JSON object",
    "manifest not JSON": "is not valid JSON", "version true": "bundle_version must be an integer, found True",
    "version 1.0": "bundle_version must be an integer, found 1.0", "version text": "bundle_version must be an integer",
    "no files": "files must map", "files a list": "files must map",
    "digest not hex": "SHA-256 of cv_summary.yaml must be",
    "folder listed": "a folder", "parent of a listed file": "files lists both folds/0 and folds/0/",
    "unsafe name": "unsafe name", "member twice": "folds/0/plan.yaml is in the zip 2 times",
    "encrypted member": "folds/0/model.weights.h5 is encrypted",
    "unsupported compression": "folds/0/plan.yaml uses zip compression method 99",
    "bzip2 member": "folds/1/plan.yaml uses zip compression method 12",
    "corrupt member": "cv_summary.yaml cannot be read",
    "folder": "is a folder", "not a zip": "not a readable zip",
    "garbage plan, rehashed": "folds/0/plan.yaml is not a valid plan",
    "binary plan, rehashed": "folds/1/plan.yaml is not a valid plan",
    "invalid plan, rehashed": "folds/0/plan.yaml is not a valid plan: folds/0/plan.yaml:",
    "weights of another network, rehashed": "folds/0/model.weights.h5",
    "garbage weights, rehashed": "folds/1/model.weights.h5",
}


@pytest.mark.e2e
@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_bundle_fails_by_name_with_exit_2(exported, tmp_path, case):
    bad = _malformed(case, exported.bundle, tmp_path / "bad.zip")
    line = _refused_predict(bad, exported.inp, tmp_path / "out")
    assert MALFORMED[case] in line, line
    assert "Traceback" not in line


@pytest.mark.e2e
@pytest.mark.parametrize("case", ["empty folds", "duplicate folds", "folder", "encrypted member",
                                  "garbage plan, rehashed"])
def test_plan_from_a_malformed_bundle_fails_by_name_with_exit_2(exported, tmp_path, case):
    bad = _malformed(case, exported.bundle, tmp_path / "bad.zip")
    out = exported.root / "ft" / f"{case.replace(' ', '_').replace(',', '')}.yaml"  # one folder: one fingerprint
    line = _assert_refused(bad, ["plan", exported.phantoms, "-o", out, "--gpu-memory", "4", "--from", bad], out)
    assert MALFORMED[case] in line, line


def _bomb(dst: Path, name: str, megabytes: int) -> str:
    """Write ``dst``: a zip of one member of ``megabytes`` MB of zeros (about 1/1000 of that on disk),
    streamed in; return its SHA-256."""
    h = hashlib.sha256()
    block = bytes(10**6)
    with (zipfile.ZipFile(dst, "a", zipfile.ZIP_DEFLATED, compresslevel=9) as z,
          z.open(name, "w", force_zip64=True) as f):
        for _ in range(megabytes):
            f.write(block)
            h.update(block)
    return h.hexdigest()


@pytest.mark.e2e
def test_a_decompression_bomb_is_refused_by_its_declared_size_and_nothing_is_written(exported, tmp_path):
    """The issue's bomb: a 0.6 MB zip whose weights inflate to 600 MB, with a manifest that matches
    (anyone can write one). Refused by the declared size against the default limit, before reading."""
    from segplan.planner.bundle_file import MAX_MEMBER_MB, BundleError, open_bundle
    m = _manifest_of(exported.bundle)
    bomb = tmp_path / "bomb.zip"
    digest = _bomb(bomb, "folds/0/model.weights.h5", 600)
    assert bomb.stat().st_size < 10**6 and MAX_MEMBER_MB < 600
    with zipfile.ZipFile(bomb, "a") as z:
        for info, data in _entries(exported.bundle):
            if info.filename not in ("folds/0/model.weights.h5", "manifest.json"):
                z.writestr(info.filename, data)
        z.writestr("manifest.json", json.dumps({**m, "files": {**m["files"], "folds/0/model.weights.h5": digest}}))
    into = tmp_path / "into"
    with pytest.raises(BundleError, match=r"model.weights.h5 unpacks to 600.0 MB, over the limit of 512 MB per file; "
                                          r".* --max-member-mb"):
        open_bundle(bomb, into)
    assert not into.exists()
    _refused_predict(bomb, exported.inp, tmp_path / "out")


@pytest.mark.e2e
def test_members_are_hashed_by_streaming_before_anything_is_written(exported, tmp_path):
    """A 40 MB member that does not match the manifest: refused with nothing unpacked, and hashing it
    never holds it in memory. With a matching manifest, --max-member-mb decides; a raised limit
    unpacks it (and zeros are then refused as weights, by name)."""
    import tracemalloc

    from segplan.planner.bundle_file import BundleError, open_bundle
    m = _manifest_of(exported.bundle)
    bomb = tmp_path / "bomb.zip"
    digest = _bomb(bomb, "folds/1/model.weights.h5", 40)
    with zipfile.ZipFile(bomb, "a") as z:
        for info, data in _entries(exported.bundle):
            if info.filename != "folds/1/model.weights.h5":
                z.writestr(info.filename, data)
    into = tmp_path / "into"
    tracemalloc.start()
    try:
        with pytest.raises(BundleError, match="folds/1/model.weights.h5 was changed after export"):
            open_bundle(bomb, into)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not into.exists() and peak < 8 * 10**6, peak
    # the same member with a manifest that matches it
    matching = _with_manifest(bomb, tmp_path / "matching.zip",
                              {**m, "files": {**m["files"], "folds/1/model.weights.h5": digest}})
    line = _refused_predict(matching, exported.inp, tmp_path / "out", "--max-member-mb", "10")
    assert "folds/1/model.weights.h5 unpacks to 40.0 MB, over the limit of 10 MB per file" in line
    with pytest.raises(BundleError, match="over the limit of 39.9 MB"):
        open_bundle(matching, into, max_member_mb=39.9)
    assert not into.exists()
    assert open_bundle(matching, into, max_member_mb=40)["folds"] == [0, 1]
    assert (into / "folds/1/model.weights.h5").stat().st_size == 40 * 10**6
    line = _refused_predict(matching, exported.inp, tmp_path / "out", "--max-member-mb", "41")
    assert "folds/1/model.weights.h5" in line  # unpacked, then refused as weights
    assert _cli(["predict", exported.plan, "-i", exported.inp, "-o", tmp_path / "o", "--max-member-mb", "5"])[0] == 2


@pytest.mark.e2e
@pytest.mark.parametrize("flags", PREDICT_FLAG_CASES, ids=lambda f: " ".join(f) or "defaults")
def test_predict_model_honours_every_flag_of_predict_plan(exported, plan_prediction, tmp_path, flags):
    """`predict --model M FLAGS` writes exactly what `predict PLAN FLAGS` writes."""
    out = tmp_path / "from_bundle"
    assert main(["predict", "--model", str(exported.bundle), "-i", str(exported.inp), "-o", str(out), *flags]) == 0
    _same_outputs(plan_prediction(tuple(flags)), out)


def test_the_flag_cases_cover_every_option_of_predict():
    """A new `predict` option must join PREDICT_FLAG_CASES (or be refused with --model)."""
    from segplan.runner.cli import build_parser
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    options = {o for a in sub.choices["predict"]._actions for o in a.option_strings if o.startswith("--")}
    where = {"--help", "--model", "--selection", "--input", "--output", "--max-member-mb"}  # what and where, not how
    where.add("--output-format")  # DICOM input only: test_dicom predicts a SEG with --model as with a plan
    assert options - where == {f for case in PREDICT_FLAG_CASES for f in case if f.startswith("--")}


@pytest.mark.e2e
def test_the_flag_cases_change_the_prediction(exported, plan_prediction):
    """The flag cases have power: each fold, and mirroring, give other probabilities."""
    def probabilities(flags):
        out = plan_prediction(tuple(flags))
        with np.load(next(out.glob("*.npz"))) as x:
            return x["probabilities"]
    fold0 = probabilities(["--folds", "0", "--no-tta", "--save-probabilities"])
    assert not np.array_equal(fold0, probabilities(PREDICT_FLAG_CASES[2]))   # fold 1
    assert not np.array_equal(fold0, probabilities(PREDICT_FLAG_CASES[1]))   # fold 0 with mirroring


@pytest.mark.e2e
def test_folds_a_bundle_lacks_or_repeats_are_refused(exported, tmp_path):
    line = _refused_predict(exported.bundle, exported.inp, tmp_path / "o", "--folds", "0", "3")
    assert "has no fold 3; it holds folds 0, 1" in line
    rc, err = _cli(["predict", "--model", exported.bundle, "-i", exported.inp, "-o", tmp_path / "o",
                    "--folds", "1", "1"])
    assert rc == 2 and "a fold given twice" in err and not (tmp_path / "o").exists()
    rc, err = _cli(["predict", exported.plan, "-i", exported.inp, "-o", tmp_path / "o", "--folds", "0", "0"])
    assert rc == 2 and "a fold given twice" in err and not (tmp_path / "o").exists()


# Mutations of a good bundle, in the order drawn: manifest fields (types, values, duplicates, missing
# keys) and members (bytes changed, renamed, extra, dropped, repeated).
LISTED = ["folds/0/plan.yaml", "folds/0/model.weights.h5", "folds/1/plan.yaml", "folds/1/model.weights.h5",
          "postprocessing.yaml", "cv_summary.yaml"]
NAMES = ["folds/2/plan.yaml", "extra.txt", "folds/0/plan.yml", "../evil.yaml", "/abs.yaml", "folds/0/", "folds/0",
         "folds\\0\\plan.yaml", "folds/0/plan.yaml/x", "./cv_summary.yaml", "manifest.json", *LISTED]
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2, 3) | st.floats(allow_nan=False) | st.text(max_size=4),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=2),
                    max_leaves=4)
MANIFEST_EDITS = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(["bundle_version", "folds", "files", "plan", "inference", "new"]), JSON),
    st.tuples(st.just("delete"), st.sampled_from(["bundle_version", "folds", "files", "plan", "segplan_version"])),
    st.tuples(st.just("set"), st.just("bundle_version"), st.sampled_from([1, 1.0, True, "1", 2, 0])),
    st.tuples(st.just("set"), st.just("folds"), st.lists(st.integers(-1, 3), max_size=5)),
    st.tuples(st.just("drop file"), st.sampled_from(LISTED)),
    st.tuples(st.just("rename file"), st.sampled_from(LISTED), st.sampled_from(NAMES)),
    st.tuples(st.just("digest"), st.sampled_from(LISTED),
              st.sampled_from(["0" * 64, "A" * 64, "abc", 1, None, "upper"])))
MEMBER_EDITS = st.one_of(
    st.tuples(st.just("flip"), st.sampled_from(LISTED + ["manifest.json"]), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("drop"), st.sampled_from(LISTED + ["manifest.json"])),
    st.tuples(st.just("rename"), st.sampled_from(LISTED + ["manifest.json"]), st.sampled_from(NAMES)),
    st.tuples(st.just("extra"), st.sampled_from(NAMES), st.binary(max_size=16)),
    st.tuples(st.just("repeat"), st.sampled_from(LISTED + ["manifest.json"])))
HARMLESS_EDITS = st.one_of(  # edits a good bundle survives, so that acceptance is tested as often as refusal
    st.tuples(st.just("set"), st.just("folds"), st.sampled_from([[0], [1], [1, 0]])),
    st.tuples(st.just("set"), st.sampled_from(["plan", "segplan_version", "inference", "new"]), JSON),
    st.tuples(st.just("drop file"), st.sampled_from(["postprocessing.yaml", "cv_summary.yaml"])),
    st.tuples(st.just("extra"), st.sampled_from(NAMES[:-len(LISTED)]), st.binary(max_size=16)))


def _mutate(entries: list[list], edit: tuple) -> None:
    """Apply one edit to [name, bytes] entries in place (manifest edits need a JSON-object manifest)."""
    kind, *args = edit
    if kind == "extra":
        entries.insert(0, list(args))
        return
    target = args[0] if kind in ("flip", "drop", "rename", "repeat") else "manifest.json"
    at = next((i for i, (n, _) in enumerate(entries) if n == target), None)
    if at is None:
        return
    if kind in ("flip", "drop", "rename", "repeat"):
        name, data = entries[at]
        if kind == "flip" and data:
            pos = args[1] % len(data)
            entries[at][1] = data[:pos] + bytes([data[pos] ^ args[2]]) + data[pos + 1:]
        elif kind == "drop":
            del entries[at]
        elif kind == "rename":
            entries[at][0] = args[1]
        elif kind == "repeat":
            entries.append([name, data])
        return
    try:
        m = json.loads(entries[at][1])
    except ValueError:
        return
    if not isinstance(m, dict):
        return
    files = m.get("files") if isinstance(m.get("files"), dict) else {}
    if kind == "set":
        m[args[0]] = args[1]
    elif kind == "delete":
        m.pop(args[0], None)
    elif kind == "drop file":
        files.pop(args[0], None)
    elif kind == "rename file" and args[0] in files:
        files[args[1]] = files.pop(args[0])
    elif kind == "digest" and args[0] in files:
        files[args[0]] = files[args[0]].upper() if args[1] == "upper" and isinstance(files[args[0]], str) else args[1]
    entries[at][1] = json.dumps(m).encode()


@pytest.mark.e2e
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits=st.lists(st.one_of(HARMLESS_EDITS, HARMLESS_EDITS, MANIFEST_EDITS, MEMBER_EDITS), min_size=1, max_size=3))
def test_a_mutated_bundle_is_used_as_its_manifest_says_or_refused_by_name(exported, plan_prediction, edits):
    """Accepted: it predicts exactly what the work folder predicts with the manifest's folds (and its
    postprocessing, if listed). Otherwise: exit 2, one `segplan: error:` line naming the bundle."""
    entries = [[i.filename, d] for i, d in _entries(exported.bundle)]
    for edit in edits:
        _mutate(entries, edit)
    with tempfile.TemporaryDirectory(dir=exported.root) as tmp:
        bad, out = _write(Path(tmp) / "bad.zip", [tuple(e) for e in entries]), Path(tmp) / "out"
        rc, err = _cli(["predict", "--model", bad, "-i", exported.inp, "-o", out, "--no-tta", "--save-probabilities"])
        event("accepted" if rc == 0 else "refused")
        if rc == 0:
            m = _manifest_of(bad)
            flags = ("--folds", *map(str, sorted(m["folds"])), "--no-tta", "--save-probabilities",
                     *(() if "postprocessing.yaml" in m["files"] else ("--no-postprocessing",)))
            _same_outputs(plan_prediction(flags), out)
        else:
            lines = err.splitlines()
            assert rc == 2 and len(lines) == 1 and lines[0].startswith("segplan: error: ") and str(bad) in lines[0], err
            assert not out.exists()
