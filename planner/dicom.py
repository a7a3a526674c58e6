"""DICOM series as input cases: find them, check that each is one regular volume, read it.

A folder (and its subfolders) may hold several series. GDCM, through SimpleITK's
``ImageSeriesReader``, tells them apart by Series Instance UID and puts each one's slices in order
by position along the slice normal (never by file name); the series reader then builds the volume
with its geometry from the DICOM (spacing from the positions, direction, origin) and the rescale
slope/intercept applied, so a CT comes out in HU. pydicom reads the headers that decide whether a
series is such a volume. The array and geometry conversion is planner/dataset.py's ``volume_of``,
as for every other format.

A series that is not one regular volume is refused by name with the reason, and the others are
still used: a localizer, a single slice, a multi-frame file, several frames of reference, mixed
orientations, slices of different sizes, slices missing or unevenly spaced, slices at one
position, slices not stacked along their normal (a gantry tilt).

Each series gets a readable id, unique among the series found: ``<PatientID>_series<SeriesNumber>``,
made safe for file names, with ``_2``, ``_3`` ... for the second and third series that would share
one, letter case aside (in the order of their folders and UIDs; macOS and Windows file names ignore
case). Predictions and imported cases are named by it.

pydicom (and highdicom for DICOM SEG output) are the ``dicom`` extra: ``require`` says how to
install them when they are missing.
"""
from __future__ import annotations

import importlib
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from segplan.planner.dataset import Case, DatasetError, Geometry, read_image, volume_of
from segplan.planner.fileio import split_ending

INSTALL = "pip install 'segplan[dicom]'"
SPACING_TOL = 0.01        # slice gaps may differ by 1% of the median gap (positions are rounded decimals)
MIN_TOL_MM = 1e-3         # ... and by at least this much, for very thin slices
ORIENTATION_TOL = 1e-4    # direction cosines of one series' slices agree to this


class MissingExtra(ImportError):
    """An optional dependency of the DICOM support is not installed; the message says how to install it."""


def require(module: str, purpose: str):
    """Import ``module`` (pydicom, highdicom) or say what needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtra(f"{purpose} needs the Python package {module}, which is not installed: {INSTALL}") from e


@dataclass(frozen=True)
class Series:
    """One DICOM series: its readable id, UID, folder, slice files in position order, and why it is
    refused (None for a volume segplan reads)."""

    series_id: str
    uid: str
    folder: Path
    files: tuple[Path, ...]
    modality: str
    problem: str | None

    def describe(self) -> str:
        return f"series {self.series_id} ({self.folder}, Series Instance UID {self.uid})"


@dataclass(frozen=True)
class SeriesCase(Case):
    """A DICOM series as an input case: ``image_files`` are its slices in position order."""

    series: Series | None = None


def _candidate_folders(root: Path) -> list[Path]:
    """Folders under ``root`` (itself included) holding a file that is not an image segplan reads by
    its ending: where GDCM may find DICOM. A folder of NIfTI files alone is never scanned."""
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if any(not f.startswith(".") and split_ending(f) is None for f in files):
            out.append(Path(folder))
    return sorted(out)


def _safe(text: str) -> str:
    """``text`` as a file-name part: letters, digits, '.', '-'; anything else one '_'."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", text).strip("._-")


def readable_id(header) -> str:
    """``<PatientID>_series<SeriesNumber>`` of a series' first header, safe for file names."""
    patient = _safe(str(header.get("PatientID", "") or "")) or "anonymous"
    number = _safe(str(header.get("SeriesNumber", "") or "")) or "unnumbered"
    return f"{patient}_series{number}"


def unique_ids(bases: list[str], keys: list[tuple]) -> list[str]:
    """Each base made unique: the first (by ``keys``) of those sharing one keeps it, the others get
    ``_2``, ``_3`` ... (skipping any id already taken). Ids are compared ignoring case: on macOS and
    Windows ``ab12_series3.nii.gz`` and ``AB12_series3.nii.gz`` are one file, and the second
    prediction would overwrite the first."""
    fold = str.casefold
    taken, kept = {fold(b) for b in bases}, set()
    out = [""] * len(bases)
    for i in sorted(range(len(bases)), key=lambda i: (fold(bases[i]), keys[i])):
        if fold(bases[i]) not in kept:
            kept.add(fold(bases[i]))
            out[i] = bases[i]
            continue
        k = 2
        while fold(f"{bases[i]}_{k}") in taken:
            k += 1
        out[i] = f"{bases[i]}_{k}"
        taken.add(fold(out[i]))
    return out


def _floats(value) -> np.ndarray:
    return np.array([float(v) for v in value], dtype=np.float64)


def series_problem(headers: list, files: list[Path]) -> str | None:
    """Why the slices ``headers`` (pydicom datasets, in GDCM's order) are not one regular volume, in
    words that say what was found; None if they are."""
    first = headers[0]
    image_type = first.get("ImageType", [])
    image_type = [str(image_type)] if isinstance(image_type, str) else [str(v) for v in image_type]
    if any(v.upper() == "LOCALIZER" for v in image_type):
        return f"a localizer (Image Type {'/'.join(image_type)}), not a volume"
    frames = int(first.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        return (f"a multi-frame file ({frames} frames, {files[0].name}): segplan reads classic series, one file "
                "per slice; export the series that way")
    if len(headers) < 2:
        return f"a single slice ({files[0].name}), a 2D image, not a volume"
    if int(first.get("SamplesPerPixel", 1) or 1) != 1:
        return f"a colour image ({first.SamplesPerPixel} samples per pixel), not a grey-value volume"
    refs = sorted({str(h.get("FrameOfReferenceUID", "") or "none") for h in headers})
    if len(refs) > 1:
        return f"{len(refs)} frames of reference ({', '.join(refs)}) in one series: not one volume"
    lacking = [f.name for h, f in zip(headers, files)
               if not h.get("ImageOrientationPatient") or not h.get("ImagePositionPatient")]
    if lacking:
        return (f"{len(lacking)} of {len(files)} slices have no Image Orientation/Position (Patient) "
                f"(e.g. {lacking[0]}): their geometry is unknown")
    orient = np.array([_floats(h.ImageOrientationPatient) for h in headers])
    if np.abs(orient - orient[0]).max() > ORIENTATION_TOL:
        kinds = Counter(tuple(np.round(o, 3)) for o in orient)
        return "mixed orientations: " + ", ".join(f"{n} slices at ({', '.join(f'{v:g}' for v in k)})"
                                                  for k, n in kinds.items())
    no_spacing = [f.name for h, f in zip(headers, files) if len(_floats(h.get("PixelSpacing", []) or [])) != 2]
    if no_spacing:
        return (f"{len(no_spacing)} of {len(files)} slices have no Pixel Spacing (0028,0030) (e.g. {no_spacing[0]}): "
                "the size of a pixel in mm is unknown, so neither the plan's spacing nor a DICOM SEG can be made")
    sizes = Counter((int(h.Rows), int(h.Columns), tuple(_floats(h.get("PixelSpacing", []) or []))) for h in headers)
    if len(sizes) > 1:
        return "slices of different sizes or pixel spacings: " + ", ".join(
            f"{n} of {r}x{c} at {list(s)} mm" for (r, c, s), n in sizes.items())
    pos = np.array([_floats(h.ImagePositionPatient) for h in headers])
    normal = np.cross(orient[0][:3], orient[0][3:])
    along = pos @ normal
    gaps = np.diff(along)
    step = float(np.median(np.abs(gaps)))
    tol = max(SPACING_TOL * step, MIN_TOL_MM)
    same = np.flatnonzero(np.abs(gaps) <= tol)
    if same.size:
        i = int(same[0])
        return (f"slices at the same position ({files[i].name} and {files[i + 1].name}, {along[i]:.4g} mm along "
                "the normal): two acquisitions in one series?")
    if not (np.all(gaps > 0) or np.all(gaps < 0)):
        return "slices out of position order (their positions go back and forth along the normal)"
    if np.abs(np.abs(gaps) - step).max() > tol:
        kinds = Counter(round(float(abs(g)), 3) for g in gaps)
        odd = int(np.flatnonzero(np.abs(np.abs(gaps) - step) > tol)[0])
        return ("uneven slice spacing (a slice missing?): gaps of "
                + ", ".join(f"{g:g} mm x{n}" for g, n in sorted(kinds.items()))
                + f"; the first odd gap is between {files[odd].name} and {files[odd + 1].name}")
    shift = (pos - pos[0]) - np.outer(along - along[0], normal)
    if np.linalg.norm(shift, axis=1).max() > tol:
        return (f"slices not stacked along their normal (shifted by up to {np.linalg.norm(shift, axis=1).max():.3g} mm "
                "within their plane: a gantry tilt?): resample it to an orthogonal grid first")
    return None


def find_series(root: str | Path) -> list[Series]:
    """Every DICOM series under ``root`` (sorted by id), each with the reason it is refused, if any."""
    located = [(folder, uid, [Path(f) for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)])
               for folder in _candidate_folders(Path(root))
               for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))]
    if not located:
        return []   # no DICOM: pydicom is not needed (a README beside NIfTI files)
    pydicom = require("pydicom", "reading DICOM series")
    found = []
    for folder, uid, files in located:
        try:
            headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
        except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError) as e:  # a damaged file
            raise DatasetError(f"{folder}: series {uid} has an unreadable file ({e})") from e
        found.append((folder, uid, files, headers))
    ids = unique_ids([readable_id(h[0]) for _, _, _, h in found], [(str(f), u) for f, u, _, _ in found])
    folders_of = Counter(uid for _, uid, _, _ in found)
    out = []
    for sid, (folder, uid, files, headers) in zip(ids, found):
        problem = series_problem(headers, files)
        if folders_of[uid] > 1:
            problem = (f"its files lie in {folders_of[uid]} folders ("
                       + ", ".join(str(f) for f, u, _, _ in found if u == uid) + "): put them in one")
        out.append(Series(sid, uid, folder, tuple(files), str(headers[0].get("Modality", "") or ""), problem))
    return sorted(out, key=lambda s: s.series_id)


def dicom_cases(folder: Path, n_channels: int, image_files: dict[str, Path]) -> list[SeriesCase]:
    """The DICOM series under an input folder as cases ([] when it holds none), refused ones
    included (``refused``). ``image_files``: the folder's image files by other formats, which may
    not be mixed with DICOM in one call."""
    series = find_series(folder)
    if not series:
        return []
    if image_files:
        names = sorted(p.name for p in image_files.values())
        ids = [s.series_id for s in series]
        raise DatasetError(f"{folder}: holds both image files ({', '.join(names[:3])}{' ...' * (len(names) > 3)})"
                           f" and DICOM series ({', '.join(ids[:3])}{' ...' * (len(ids) > 3)}): NIfTI and DICOM "
                           "inputs may not be mixed in one call; predict them from two folders")
    if n_channels != 1:
        raise DatasetError(f"{folder}: the plan needs {n_channels} channels per case; a DICOM series is one channel")
    return [SeriesCase(s.series_id, s.files, None, s) for s in series]


MR_NAMES = ("MR", "MRI", "T1", "T1W", "T1C", "T1CE", "T1GD", "T2", "T2W", "FLAIR", "ADC", "DWI", "PD", "SWI")
PET_NAMES = ("PT", "PET")


def expected_modality(channel: str, scheme: str) -> str | None:
    """The DICOM Modality a plan's channel takes: CT for a channel normalised as CT (or named CT), MR
    for a channel named as an MR sequence, PT for PET; None where the name does not tell."""
    name = channel.strip().upper().replace("-", "").replace(" ", "")
    if scheme == "ct" or name == "CT":
        return "CT"
    if name in MR_NAMES or name.startswith("MR"):
        return "MR"
    return "PT" if name in PET_NAMES else None


def modality_problem(series: Series, channel: str, scheme: str, plan_name: str) -> str | None:
    """Why ``series`` may not be the plan's ``channel`` (an MR series to a CT plan: its values are no
    HU, and the network never saw one), or None: a series without a Modality, or a channel whose
    name does not tell, is let through."""
    want = expected_modality(channel, scheme)
    have = series.modality.strip().upper()
    if want is None or not have or have == want:
        return None
    return (f"its Modality is {have}, but channel '{channel}' of plan {plan_name} takes {want}"
            + (" (its values are read as HU)" if want == "CT" else "") + ": give it a series of that modality")


def refused(cases: list[Case]) -> list[SeriesCase]:
    """The cases that are DICOM series segplan refuses."""
    return [c for c in cases if isinstance(c, SeriesCase) and c.series.problem]


def read_series(series: Series) -> tuple[np.ndarray, Geometry]:
    """A series as a float32 (1, z, y, x) array (CT in HU: rescale slope/intercept applied) and its geometry."""
    if series.problem:
        raise DatasetError(f"{series.describe()}: refused: {series.problem}")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in series.files])
    try:
        img = reader.Execute()
    except RuntimeError as e:
        raise DatasetError(f"{series.describe()}: unreadable ({str(e).strip().splitlines()[-1]})") from e
    arr, geom = volume_of(img, series.describe())
    if arr.ndim != 3:
        raise DatasetError(f"{series.describe()}: {arr.shape[0]} components per voxel, segplan needs one")
    return arr[None].astype(np.float32, copy=False), geom


def read_case_image(case: Case) -> tuple[np.ndarray, Geometry]:
    """The (c, z, y, x) image of an input case and its geometry: from its files, or from the DICOM
    series it was found as."""
    if isinstance(case, SeriesCase):
        return read_series(case.series)
    return read_image(case)
