"""The cases of an input folder (one file per case, nnU-Net's ``<case>_0000`` channel files, or DICOM
series), and the guard that keeps predictions from overwriting them."""
from __future__ import annotations

import os
import re
from pathlib import Path

from segplan.planner.dataset import Case, DatasetError
from segplan.planner.dicom import dicom_cases
from segplan.planner.fileio import ENDINGS, image_files

CHANNEL = re.compile(r"^(.*)_(\d{4})$")


def find_input_cases(folder: Path, n_channels: int) -> list[Case]:
    """Cases of a folder: nnU-Net style ``<case>_0000.nii.gz`` per channel, or one file per case, or
    the DICOM series in it and its subfolders (planner/dicom.py; not mixed with other files)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: no such input folder")
    files = image_files(folder)
    series = dicom_cases(folder, n_channels, files)
    if series:
        return series
    if not files:
        raise DatasetError(f"{folder}: no image files ({', '.join(ENDINGS)}) and no DICOM series")
    if all(CHANNEL.match(stem) for stem in files):
        groups: dict[str, dict[int, Path]] = {}
        for stem, p in files.items():
            m = CHANNEL.match(stem)
            groups.setdefault(m.group(1), {})[int(m.group(2))] = p
        cases = []
        for cid, ch in groups.items():
            if sorted(ch) != list(range(n_channels)):
                raise DatasetError(f"{folder}: case {cid} has channels {sorted(ch)}, the plan needs {list(range(n_channels))}")
            cases.append(Case(cid, tuple(ch[c] for c in range(n_channels)), None))
        return cases
    if n_channels != 1:
        raise DatasetError(f"{folder}: the plan needs {n_channels} channels per case as <case>_0000.. files")
    return [Case(stem, (p,), None) for stem, p in files.items()]


def refuse_overwrite(input_dir: Path, output_dir: Path, cases: list[Case] | None = None) -> None:
    """Refuse, before anything is predicted, an output folder that is the input folder, or (given
    the ``cases`` found there) one where a prediction (``<case>.nii.gz``, ``.dcm`` or ``.npz``) would
    replace an input file: `segplan predict -i X -o X` once replaced each CT by its label map."""
    src, dst = Path(input_dir).resolve(), Path(output_dir).resolve()
    if src == dst or (src.is_dir() and dst.is_dir() and os.path.samefile(src, dst)):  # a bind mount, another case
        raise DatasetError(f"-o {output_dir}: that is the input folder; the predictions would be written among "
                           "(and could replace) the images: choose another output folder")
    if cases is None:
        return
    inputs = {Path(p).resolve() for c in cases for p in c.image_files}
    for case in cases:
        for ending in (".nii.gz", ".dcm", ".npz"):
            if (dst / f"{case.case_id}{ending}") in inputs:
                raise DatasetError(f"-o {output_dir}: the prediction of case {case.case_id} would replace the input "
                                   f"{dst / (case.case_id + ending)}: choose another output folder")
