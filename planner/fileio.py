"""Crash-safe file writes and file-name rules, in one place.

Every file segplan writes goes to a temporary name in the same folder (``.tmp_<name>``: hidden, the
same ending, so SimpleITK and numpy still see the format) and is renamed when complete. A kill at
any moment leaves either the old file or the new one, never half of one; leftovers all start with
``TEMP_PREFIX`` and can be swept. Image formats and the case id of a file name live here too.
"""
from __future__ import annotations

import contextlib
import os
import json
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import yaml

TEMP_PREFIX = ".tmp_"
ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


def temp_path(path: Path) -> Path:
    return Path(path).with_name(TEMP_PREFIX + Path(path).name)


@contextlib.contextmanager
def atomic(path: Path, own: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; rename it to ``path`` if the block succeeds, else remove it.
    ``own``: a temporary name of this process's own (its pid), for a file that several processes may
    write at once (each renames a whole file of its own; the last rename wins)."""
    path = Path(path)
    tmp = temp_path(path) if not own else path.with_name(f"{TEMP_PREFIX}{os.getpid()}_{path.name}")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    with atomic(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, data: Any, indent: int | None = None) -> None:
    write_text(path, json.dumps(data, indent=indent))


def write_yaml(path: Path, data: Any, header: str = "") -> None:
    """Plain data (dicts, lists, numbers, text) as YAML, keys in their order, under a '#' header."""
    head = "".join(f"# {line}\n" for line in header.splitlines())
    write_text(path, head + yaml.safe_dump(data, sort_keys=False))


def save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr, allow_pickle=False)


def save_npz(path: Path, compressed: bool = False, **arrays: np.ndarray) -> None:
    """An ``.npz`` that ``np.load`` reads, written atomically. ``compressed``: deflate at level 1,
    not np.savez_compressed's default 6: a 512 x 512 x 300 CT's 4 float16 probability channels
    (630 MB) compress in 10.8 s instead of 63.6 s into a file 4% larger (315 MB against 304)."""
    if not compressed:
        with atomic(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
        return
    with atomic(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=1, allowZip64=True) as z:
        for name, array in arrays.items():
            with z.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)


def save_figure(fig, path: Path, dpi: int = 90) -> None:
    with atomic(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")


def sweep_temporaries(folder: Path) -> int:
    """Remove what a killed writer left in ``folder``; returns how many files."""
    n = 0
    for p in Path(folder).glob(TEMP_PREFIX + "*"):
        p.unlink(missing_ok=True)
        n += 1
    return n


def split_ending(name: str) -> tuple[str, str] | None:
    """('case_001', '.nii.gz') for 'case_001.nii.gz'; None for hidden files and other formats."""
    if name.startswith("."):
        return None
    for end in ENDINGS:
        if name.endswith(end):
            return name[: -len(end)], end
    return None


def renamed(path: Path, stem: str) -> str:
    """The file name ``stem`` + ``path``'s own ending ('case_001.nrrd' -> 'lung1.nrrd'): a link or
    copy of an image keeps its format, as SimpleITK picks the reader by the ending."""
    parts = split_ending(Path(path).name)
    if parts is None:
        raise ValueError(f"{path}: not an image file segplan reads ({', '.join(ENDINGS)})")
    return stem + parts[1]


def data_files(path: Path) -> list[str]:
    """The files an image header keeps its voxels in, as it names them (relative to its folder): they
    must lie beside any link to the header. A MetaImage ``.mhd``'s ``ElementDataFile``; none for the
    self-contained formats (.nii.gz, .nii, .nrrd, .mha) or a ``LOCAL``/``LIST`` data file."""
    path = Path(path)
    if not path.name.endswith(".mhd"):
        return []
    for line in path.read_text(errors="replace").splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "ElementDataFile":
            value = value.strip()
            return [] if value == "LOCAL" or value.startswith("LIST") or "%" in value else [value]
    return []


def image_files(folder: Path) -> dict[str, Path]:
    """Image files of a folder by name without ending, sorted."""
    out = {}
    for p in sorted(Path(folder).iterdir()):
        parts = split_ending(p.name)
        if parts:
            out[parts[0]] = p
    return out
