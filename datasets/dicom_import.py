"""`segplan import dicom DIR --labels LABELS_DIR -o DATASET`: DICOM series plus label files -> an
nnU-Net raw dataset (imagesTr/, labelsTr/, imagesTs/, dataset.json) to plan and train on.

The series are found, checked and named as `segplan predict` finds them (planner/dicom.py). A label
file (any format segplan reads, at the top of LABELS_DIR) belongs to

1. the series whose id it is named after: ``PAT1_series3.nii.gz`` for series ``PAT1_series3`` (the
   name `segplan predict` gives that series' prediction, so a corrected prediction comes back as is);
2. else the one series in a folder of its name: ``liver_017.nii.gz`` for ``DIR/.../liver_017/``
   holding that series alone (one series per patient folder, as many exports are laid out); a
   refused series beside it, such as a localizer, does not count.

A label file that matches no series, or more than one, stops the import by name, and so does one
whose series is refused (a localizer, a missing slice ...). Each label map must lie on its series'
grid (checked as check-dataset checks image and label). Series without a label file go to imagesTs/;
refused series without one are only named (a localizer beside a CT is normal). Class names come from
``LABELS_DIR/labels.json`` (``{"background": 0, "liver": 1}``) when there is one, else
``label_<value>``. The dataset is built beside DATASET under a temporary name and renamed when
complete: an import that stops leaves nothing behind.
"""
from __future__ import annotations

import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from segplan.planner.dataset import DatasetError, read_label, write_volume
from segplan.planner.dicom import Series, find_series, read_series
from segplan.planner.fileio import TEMP_PREFIX, image_files, write_json
from segplan.planner.integrity import compare_geometry

CHANNEL_NAMES = {"CT": "CT", "MR": "MRI"}   # DICOM Modality -> dataset.json channel name (CT is read as CT)


def match_labels(series: list[Series], labels: dict[str, Path]) -> tuple[dict[str, Path], list[str]]:
    """Series id -> its label file (by the rule above), and what does not match, in words."""
    by_id = {s.series_id: s for s in series}
    in_folder: dict[Path, list[Series]] = {}
    for s in series:
        in_folder.setdefault(s.folder, []).append(s)
    alone: dict[str, list[Series]] = {}
    for folder, members in in_folder.items():
        usable = [s for s in members if not s.problem] or members  # a localizer beside the CT does not count
        if len(usable) == 1:
            alone.setdefault(folder.name, []).append(usable[0])
    matched: dict[str, Path] = {}
    problems = []
    for stem, path in sorted(labels.items()):
        owners = [by_id[stem]] if stem in by_id else alone.get(stem, [])
        if not owners:
            problems.append(f"{path}: matches no series: name it after a series id ({_some(by_id)}) or after the "
                            f"folder holding its series alone ({_some(alone) or 'none'})")
        elif len(owners) > 1:
            problems.append(f"{path}: matches {len(owners)} series in folders named {stem} ("
                            + ", ".join(str(s.folder) for s in owners) + "): name it after a series id")
        elif owners[0].series_id in matched:
            problems.append(f"{path} and {matched[owners[0].series_id]}: both match series {owners[0].series_id}")
        else:
            matched[owners[0].series_id] = path
    return matched, problems


def _some(names, most: int = 8) -> str:
    """Up to ``most`` names, sorted, then how many more."""
    names = sorted(names)
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _label_names(labels_dir: Path, values: set[int]) -> dict[str, int]:
    """LABELS_DIR/labels.json if there is one (every value found must be declared), else label_<value>."""
    path = labels_dir / "labels.json"
    if not path.exists():
        return {"background": 0} | {f"label_{v}": v for v in sorted(values - {0})}
    try:
        names = {str(k): int(v) for k, v in json.loads(path.read_text()).items()}
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError) as e:
        raise DatasetError(f"{path}: not a JSON object of class name -> label value ({e})") from e
    if names.get("background") != 0:
        raise DatasetError(f"{path}: needs \"background\": 0")
    undeclared = sorted(values - set(names.values()))
    if undeclared:
        raise DatasetError(f"{path}: the label files hold values {undeclared} it does not name")
    return names


def _stored(arr: np.ndarray) -> np.ndarray:
    """An image as int16 where its values are whole numbers in range (a CT in HU), else as it is."""
    if np.issubdtype(arr.dtype, np.integer) or np.array_equal(np.rint(arr), arr):
        if arr.size and arr.min() >= np.iinfo(np.int16).min and arr.max() <= np.iinfo(np.int16).max:
            return arr.astype(np.int16)
    return arr


def import_dicom(dicom_dir: str | Path, labels_dir: str | Path, out: str | Path) -> Path:
    """Build the nnU-Net raw dataset ``out`` from the series under ``dicom_dir`` and the label files
    in ``labels_dir``; raises DatasetError naming every file or series that does not fit."""
    dicom_dir, labels_dir, out = Path(dicom_dir), Path(labels_dir), Path(out)
    if not labels_dir.is_dir():
        raise DatasetError(f"{labels_dir}: no such labels folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: exists and is not empty; choose another -o or remove it")
    series = find_series(dicom_dir)
    if not series:
        raise DatasetError(f"{dicom_dir}: no DICOM series found (in it or its subfolders)")
    matched, problems = match_labels(series, image_files(labels_dir))
    for s in series:
        if s.problem and s.series_id in matched:
            problems.append(f"{matched[s.series_id]}: its {s.describe()} is refused: {s.problem}")
        elif s.problem:
            print(f"segplan: skipped {s.describe()}: {s.problem}", file=sys.stderr, flush=True)
    usable = [s for s in series if not s.problem]
    modalities = Counter(s.modality for s in usable)
    if len(modalities) > 1:
        found = ", ".join(f"{m or 'none'}: {n}" for m, n in modalities.items())
        problems.append(f"series of several modalities ({found}): a dataset has one channel; import them from "
                        "separate folders")
    if not any(s.series_id in matched for s in usable):
        problems.append(f"{labels_dir}: no label file matches a usable series")
    if problems:
        raise DatasetError(f"{dicom_dir}: cannot import:\n  " + "\n  ".join(problems))
    tmp = out.parent / (TEMP_PREFIX + out.name)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        values: set[int] = set()
        source = {}
        for s in usable:
            image, geom = read_series(s)
            label = matched.get(s.series_id)
            folder = "imagesTr" if label else "imagesTs"
            if label:
                lbl, lg = read_label(label)
                diffs = compare_geometry(geom, lg)
                if diffs:
                    raise DatasetError(f"{label}: not on the grid of {s.describe()}: {'; '.join(diffs)}")
                values |= {int(v) for v in np.unique(lbl)}
                write_volume(lbl.astype(np.uint8 if lbl.min() >= 0 and lbl.max() < 256 else np.int16), geom,
                             tmp / "labelsTr" / f"{s.series_id}.nii.gz")
            write_volume(_stored(image[0]), geom, tmp / folder / f"{s.series_id}_0000.nii.gz")
            source[s.series_id] = {"series_instance_uid": s.uid, "folder": str(s.folder.relative_to(dicom_dir)),
                                   "label_file": label.name if label else None}
        modality = next(iter(modalities))
        meta = {"name": out.name, "channel_names": {"0": CHANNEL_NAMES.get(modality, modality or "channel0")},
                "labels": _label_names(labels_dir, values), "numTraining": len(matched),
                "file_ending": ".nii.gz", "description": f"segplan import dicom {dicom_dir}",
                "source_series": source}
        write_json(tmp / "dataset.json", meta, indent=2)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
