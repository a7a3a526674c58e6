"""Check a dataset before anything is planned: every problem of every case, reported at once."""
from __future__ import annotations

import gzip
import zlib
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from segplan.planner.dataset import Case, Dataset, DatasetError, Geometry, read_volume
from segplan.planner.layouts import load_dataset
from segplan.planner.intensity import explain_convention

SPACING_TOL = 1e-3   # relative
ORIGIN_TOL = 1e-2    # mm
DIRECTION_TOL = 1e-3
CT_LOOKS = {"hu": "Hounsfield air", "windowed": "the 0..255 windowed look", "shifted_hu": "the HU + 1024 look"}
MAX_NAMED = 20       # cases named in one dataset-level warning; the rest are counted


@dataclass(frozen=True)
class Problem:
    """One finding: 'error' stops planning, 'warning' does not."""

    severity: str
    case: str
    file: str
    message: str

    def __str__(self) -> str:
        return f"{self.severity.upper():7s} {self.case}: {self.file}: {self.message}"


def compare_geometry(a: Geometry, b: Geometry) -> list[str]:
    """Human-readable differences between two geometries, with the size of each difference."""
    out = []
    if tuple(a.shape) != tuple(b.shape):
        out.append(f"shape {list(a.shape)} vs {list(b.shape)} (z, y, x)")
    sa, sb = np.array(a.spacing), np.array(b.spacing)
    if np.any(np.abs(sa - sb) > SPACING_TOL * np.maximum(sa, sb)):
        out.append(f"spacing {sa.round(4).tolist()} vs {sb.round(4).tolist()} mm (z, y, x), "
                   f"max difference {np.abs(sa - sb).max():.4g} mm")
    oa, ob = np.array(a.origin), np.array(b.origin)
    if np.any(np.abs(oa - ob) > ORIGIN_TOL):
        out.append(f"origin differs by {np.abs(oa - ob).max():.4g} mm")
    da, db = np.array(a.direction), np.array(b.direction)
    if np.any(np.abs(da - db) > DIRECTION_TOL):
        out.append(f"direction differs by {np.abs(da - db).max():.4g}")
    return out


def gzip_intact(path: Path) -> str | None:
    """None if a .gz file decompresses to its end; else what is wrong. ITK's reader can return a
    truncated .nii.gz without complaint, so the check reads the stream itself."""
    if not str(path).endswith(".gz"):
        return None
    try:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 22):
                pass
    except (EOFError, OSError, zlib.error) as e:
        return f"truncated or corrupt compressed file ({e})"
    return None


def nifti_nonfinite(path: Path) -> int:
    """NaN/Inf voxels of a float NIfTI file, counted in the raw payload: ITK's NIfTI reader silently
    turns NaN into 0, so they cannot be seen in the array SimpleITK returns."""
    name = str(path)
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        return 0
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rb") as f:
        header = f.read(352)
        if len(header) < 348:
            return 0
        order = "<" if np.frombuffer(header[:4], "<i4")[0] == 348 else ">"
        dtype = {16: np.dtype(order + "f4"), 64: np.dtype(order + "f8")}.get(int(np.frombuffer(header[70:72], order + "i2")[0]))
        if dtype is None:
            return 0
        offset = int(np.frombuffer(header[108:112], order + "f4")[0])
        f.read(max(offset - 352, 0))
        bad = 0
        while chunk := f.read(dtype.itemsize * (1 << 20)):
            bad += int(np.count_nonzero(~np.isfinite(np.frombuffer(chunk[: len(chunk) // dtype.itemsize * dtype.itemsize], dtype))))
        return bad


def _check_case(case: Case, allowed: set[int], ct_flags: list[bool] | None = None,
                sniff: list[bool] | None = None) -> tuple[list[Problem], dict[int, str]]:
    """The problems of one case, and the CT convention each channel flagged in ``sniff`` would show
    (channels segplan took for not CT: check_dataset names those that look like CT all the same)."""
    probs: list[Problem] = []
    looks: dict[int, str] = {}

    def add(sev: str, path, msg: str) -> None:
        probs.append(Problem(sev, case.case_id, str(path), msg))

    geoms: list[tuple[Path, Geometry]] = []
    for path in case.image_files:
        if not Path(path).exists():
            add("error", path, "image file missing")
            continue
        broken = gzip_intact(path)
        if broken:
            add("error", path, f"unreadable: {broken}")
            continue
        try:
            arr, g = read_volume(path)
        except DatasetError as e:
            add("error", path, str(e).split(": ", 1)[-1])
            continue
        if np.issubdtype(arr.dtype, np.floating):
            bad = max(int(np.count_nonzero(~np.isfinite(arr))), nifti_nonfinite(path))
            if bad:
                add("error", path, f"{bad} NaN/Inf voxels")
        channel = len(geoms)
        if ct_flags and channel < len(ct_flags) and ct_flags[channel] and arr.ndim == 3:
            conv, why = explain_convention(arr, True)
            if conv == "unknown":
                add("warning", path, f"CT values show no known unit: {why}; the plan will assume HU: set "
                                     f"intensity.conventions.{case.case_id} to hu, windowed or shifted_hu")
        if sniff and channel < len(sniff) and sniff[channel] and arr.ndim == 3:
            looks[channel] = explain_convention(arr, True)[0]
        geoms.append((path, g))
    for path, g in geoms[1:]:
        for diff in compare_geometry(geoms[0][1], g):
            add("error", path, f"channel geometry differs from {Path(geoms[0][0]).name}: {diff}")
    if case.label_file is None:
        return probs, looks
    if not Path(case.label_file).exists():
        add("error", case.label_file, "label file missing")
        return probs, looks
    broken = gzip_intact(case.label_file)
    if broken:
        add("error", case.label_file, f"unreadable: {broken}")
        return probs, looks
    try:
        lbl, lg = read_volume(case.label_file)
    except DatasetError as e:
        add("error", case.label_file, str(e).split(": ", 1)[-1])
        return probs, looks
    if lbl.ndim != 3:
        add("error", case.label_file, "label map has more than one component")
        return probs, looks
    if np.issubdtype(lbl.dtype, np.floating) and not np.all(np.isfinite(lbl)):
        add("error", case.label_file, "NaN/Inf in label map")
        return probs, looks
    values = {int(v) for v in np.unique(lbl)}
    extra = sorted(values - allowed)
    if extra:
        add("error", case.label_file, f"label values {extra} are not declared in the dataset's labels "
                                      f"{sorted(allowed)}")
    if values <= {0}:
        add("warning", case.label_file, "label map is all background")
    if geoms:
        for diff in compare_geometry(geoms[0][1], lg):
            add("error", case.label_file, f"image/label mismatch: {diff}")
    return probs, looks


def check_dataset(root: str | Path, workers: int = 1, progress: bool = True) -> tuple[Dataset | None, list[Problem]]:
    """Read every case of ``root`` and return all problems found; never raises for a data problem."""
    try:
        ds = load_dataset(root)
    except DatasetError as e:
        return None, [Problem("error", "-", str(root), str(e))]
    problems: list[Problem] = []
    for cid, n in Counter(c.case_id for c in ds.cases).items():
        if n > 1:
            problems.append(Problem("error", cid, str(ds.root), f"case id appears {n} times"))
    allowed = set(ds.labels.values()) | ({ds.ignore_label} if ds.ignore_label is not None else set())
    from segplan.planner.parallel import parallel_map
    ct_flags = [ds.is_ct(c) for c in range(ds.num_channels)]
    # channels segplan took for not CT (plain layout, name not changed by a person): do any cases look like CT?
    sniff = [ds.layout == "plain" and not ct_flags[c] and c in ds.channel_evidence for c in range(ds.num_channels)]
    results = parallel_map(_check_one, [(c, allowed, ct_flags, sniff) for c in ds.cases], workers,
                           desc="check-dataset", progress=progress)
    for r, _ in results:
        problems.extend(r)
    problems.extend(ct_looks_not_taken(ds, [(c.case_id, looks) for c, (_, looks) in zip(ds.cases, results)]))
    problems.extend(orientations_that_differ(ds))
    if not ds.cases:
        problems.append(Problem("error", "-", str(ds.root), "no cases found"))
    return ds, problems


def orientations_that_differ(ds: Dataset) -> list[Problem]:
    """One warning naming the cases stored in another orientation than most (read from the headers):
    a plan brings them to the majority's (planner/orientation.py), but a reader should know."""
    import SimpleITK as sitk
    from segplan.planner.orientation import majority, orientation_code
    codes = {}
    for case in ds.cases:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(case.image_files[0]))
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            continue  # unreadable: _check_case has said so
        if reader.GetDimension() != 3:
            continue  # a 2D image: _check_case has said so
        codes[case.case_id] = orientation_code(reader.GetDirection())
    code = majority(list(codes.values()))
    other = [(cid, c) for cid, c in codes.items() if c != code]
    if not other:
        return []
    named = ", ".join(f"{cid} ({c})" for cid, c in other[:MAX_NAMED])
    more = f" and {len(other) - MAX_NAMED} more" if len(other) > MAX_NAMED else ""
    return [Problem("warning", "-", str(ds.root), (
        f"{len(codes) - len(other)} of {len(codes)} cases are stored {code}, {len(other)} otherwise: {named}{more}. "
        f"A plan records {code} (dataset.orientation) and brings every image to it by axis permutation and flips "
        "before preprocessing, predictions go back to each input's own orientation; check that the others' "
        "direction cosines are right (a header that lies would mirror their labels)"))]


def ct_looks_not_taken(ds: Dataset, looks: list[tuple[str, dict[int, str]]]) -> list[Problem]:
    """One warning per channel that segplan took for not CT although some cases look like CT: it
    names them and says how to declare the channel CT (or name it, to say it is not)."""
    out = []
    meta = Path(ds.root) / "dataset.yaml"
    for c in range(ds.num_channels):
        seen = [(cid, lk[c]) for cid, lk in looks if lk.get(c) in CT_LOOKS]
        if not seen:
            continue
        named = ", ".join(f"{cid} ({CT_LOOKS[look]})" for cid, look in seen[:MAX_NAMED])
        more = f" and {len(seen) - MAX_NAMED} more" if len(seen) > MAX_NAMED else ""
        out.append(Problem("warning", "-", str(meta), (
            f"channel {c} ('{ds.channel_names[c]}') is taken for NOT CT and normalised per case (z-score, as MRI): "
            f"{ds.channel_evidence.get(c, 'its name')}. Yet {len(seen)} of {len(looks)} cases look like CT: "
            f"{named}{more}. If it is CT, declare it in {meta} (channel_names: {{{c}: CT}}) and plan again: each "
            "case's unit is then detected (HU, 0..255 windowed, HU + 1024) and mapped to HU. If it is not CT, name "
            "it there (e.g. MRI) to say so")))
    return out


def _check_one(args) -> tuple[list[Problem], dict[int, str]]:
    case, allowed, ct_flags, sniff = args
    try:
        return _check_case(case, allowed, ct_flags, sniff)
    except Exception as e:  # any unforeseen failure is reported against the case, never a traceback
        return [Problem("error", case.case_id, str(case.image_files[0]), f"could not be checked: {e!r}")], {}


def problems_to_json(problems: list[Problem]) -> list[dict]:
    return [asdict(p) for p in problems]
