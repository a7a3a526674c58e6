"""Find the cases of a dataset folder.

Two layouts are understood:

* the nnU-Net v2 raw layout: ``dataset.json`` + ``imagesTr/<case>_<XXXX><ending>`` (one file per
  channel) + ``labelsTr/<case><ending>`` (+ optional ``imagesTs/``);
* a plain layout: ``images/<case><ending>`` + ``labels/<case><ending>``, no dataset.json. Channel
  count, modality (CT or not) and label values are then inferred and written to ``dataset.yaml``,
  which the user may edit; what the modality was inferred from is kept there for the plan's notes.

Regions and unannotated voxels are read as nnU-Net writes them in dataset.json (``label_entries``:
list-valued labels with ``regions_class_order``, an ``"ignore"`` label); a plain layout's
dataset.yaml may give ``regions``, ``regions_class_order`` and ``ignore_label`` directly.
The cases, datasets and volumes themselves: planner/dataset.py.
"""
from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import yaml

from segplan.planner.dataset import Case, Dataset, DatasetError
from segplan.planner.fileio import ENDINGS, split_ending, write_text

PLAIN_CT_SAMPLE = 5    # images looked at to decide whether a plain-layout channel is CT
INFERRED_KEY = "inferred_channels"   # dataset.yaml: what segplan saw when it named each channel


def load_dataset(root: str | Path, infer_plain: bool = True) -> Dataset:
    """Find the layout of ``root`` and list its cases; raise DatasetError with the offending path."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such dataset folder")
    if (root / "dataset.json").exists() or (root / "imagesTr").is_dir():
        return _load_nnunet(root)
    if (root / "images").is_dir():
        return _load_plain(root, infer=infer_plain)
    raise DatasetError(f"{root}: neither an nnU-Net raw dataset (dataset.json, imagesTr/, labelsTr/) "
                       "nor a plain one (images/, labels/)")


def _load_nnunet(root: Path) -> Dataset:
    meta_path = root / "dataset.json"
    if not meta_path.exists():
        raise DatasetError(f"{meta_path}: missing; an nnU-Net raw dataset needs it")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{meta_path}: not valid JSON ({e})") from e
    for key in ("channel_names", "labels", "file_ending"):
        if key not in meta:
            raise DatasetError(f"{meta_path}: key '{key}' is missing")
    channels = {int(k): str(v) for k, v in meta["channel_names"].items()}
    labels, regions, order, ignore = label_entries(meta["labels"], meta.get("regions_class_order"), meta_path)
    ending = meta["file_ending"]
    cases = _nnunet_cases(root / "imagesTr", root / "labelsTr", ending, len(channels))
    test = _nnunet_cases(root / "imagesTs", None, ending, len(channels)) if (root / "imagesTs").is_dir() else []
    return Dataset(root, "nnunet", channels, labels, ending, cases, test, regions=regions, regions_class_order=order,
                   ignore_label=ignore)


def label_entries(entries: dict, order, meta_path: Path) -> tuple[dict[str, int], dict[str, list[int]], list[int], int | None]:
    """dataset.json's ``labels`` as nnU-Net reads them (LabelManager): (labels, regions,
    regions_class_order, ignore label).

    ``"ignore": N`` marks unannotated voxels: no label of its own. As soon as one entry is a list
    of several values, every foreground entry is a region (a single value a region of one label),
    ``regions_class_order`` is required, and the label values, which such a file does not name, are
    named ``label_<value>``. Otherwise a one-value list is that value."""
    if not isinstance(entries, dict):
        raise DatasetError(f"{meta_path}: 'labels' must map names to values")
    entries = dict(entries)
    ignore = entries.pop("ignore", None)
    if ignore is not None and (isinstance(ignore, bool) or not isinstance(ignore, int)):
        raise DatasetError(f"{meta_path}: labels.ignore is {ignore!r}; it must be one integer value")

    def values(name, v) -> list[int]:
        vs = v if isinstance(v, (list, tuple)) else [v]
        if not vs or any(isinstance(x, bool) or not isinstance(x, int) for x in vs):
            raise DatasetError(f"{meta_path}: labels.{name} is {v!r}; expected an integer or a list of integers")
        return [int(x) for x in vs]
    parsed = {str(k): values(k, v) for k, v in entries.items()}
    if not any(len(v) > 1 for v in parsed.values()):
        return {k: v[0] for k, v in parsed.items()}, {}, [], ignore
    if parsed.get("background") != [0]:
        raise DatasetError(f"{meta_path}: labels.background must be 0 (a single value) in a dataset with regions")
    if order is None:
        raise DatasetError(f"{meta_path}: labels are written as regions (lists of values) but 'regions_class_order' "
                           "is missing: give the label value to write for each region, in order (nnU-Net)")
    regions = {k: v for k, v in parsed.items() if k != "background"}
    labels = {"background": 0} | {f"label_{v}": v for v in sorted({x for vs in regions.values() for x in vs} - {0})}
    return labels, regions, [int(v) for v in order], ignore


def _nnunet_cases(img_dir: Path, lbl_dir: Path | None, ending: str, n_channels: int) -> list[Case]:
    pattern = re.compile(r"^(.*)_(\d{4})" + re.escape(ending) + "$")
    by_case: dict[str, dict[int, Path]] = {}
    if img_dir.is_dir():
        for p in sorted(img_dir.iterdir()):
            m = pattern.match(p.name)
            if m and not p.name.startswith("."):
                by_case.setdefault(m.group(1), {})[int(m.group(2))] = p
    ids = set(by_case)
    if lbl_dir is not None and lbl_dir.is_dir():
        ids |= {p.name[: -len(ending)] for p in lbl_dir.iterdir()
                if p.name.endswith(ending) and not p.name.startswith(".")}
    cases = []
    for cid in sorted(ids):
        chans = by_case.get(cid, {})
        files = tuple(chans.get(c, img_dir / f"{cid}_{c:04d}{ending}") for c in range(n_channels))
        label = (lbl_dir / f"{cid}{ending}") if lbl_dir is not None else None
        cases.append(Case(cid, files, label))
    return cases


def _load_plain(root: Path, infer: bool) -> Dataset:
    img_dir, lbl_dir = root / "images", root / "labels"
    images: list[tuple[str, Path]] = []   # a list, not a dict: two files of one case id stay visible
    ending = None
    for p in sorted(img_dir.iterdir()):
        parts = split_ending(p.name)
        if parts:
            images.append((parts[0], p))
            ending = ending or parts[1]
    labels: dict[str, Path] = {}
    if lbl_dir.is_dir():
        for p in sorted(lbl_dir.iterdir()):
            parts = split_ending(p.name)
            if parts:
                labels[parts[0]] = p
                ending = ending or parts[1]
    if ending is None:
        raise DatasetError(f"{img_dir}: no image files ({', '.join(ENDINGS)})")
    known = {cid for cid, _ in images}
    images += [(cid, img_dir / p.name) for cid, p in labels.items() if cid not in known]
    cases = [Case(cid, (img,), labels.get(cid, lbl_dir / img.name)) for cid, img in sorted(images)]
    meta_path = root / "dataset.yaml"
    if meta_path.exists():
        meta = yaml.safe_load(meta_path.read_text()) or {}
        channels = {int(k): str(v) for k, v in meta.get("channel_names", {}).items()}
        labels = {str(k): int(v) for k, v in meta.get("labels", {}).items()}
        if not channels or "background" not in labels:
            raise DatasetError(f"{meta_path}: needs 'channel_names' and 'labels' with a 'background'")
        regions = {str(k): [int(x) for x in v] for k, v in (meta.get("regions") or {}).items()}
        return Dataset(root, "plain", channels, labels, ending, cases, [], _still_inferred(meta, channels),
                       regions, [int(v) for v in meta.get("regions_class_order") or []],
                       None if meta.get("ignore_label") is None else int(meta["ignore_label"]))
    channels, labels, evidence = _infer_plain_meta(cases)
    ds = Dataset(root, "plain", channels, labels, ending, cases, [], evidence)
    if infer:
        _write_plain_meta(ds, meta_path)
    return ds


def _still_inferred(meta: dict, channels: dict[int, str]) -> dict[int, str]:
    """The evidence segplan wrote in dataset.yaml for each channel whose name nobody has changed
    since (a renamed channel is declared by a person)."""
    inferred = meta.get(INFERRED_KEY)
    if not isinstance(inferred, dict):
        return {}
    out = {}
    for k, v in inferred.items():
        if isinstance(v, dict) and str(k).isdigit() and channels.get(int(k)) == v.get("name") and v.get("evidence"):
            out[int(k)] = str(v["evidence"])
    return out


def _infer_plain_meta(cases: list[Case]) -> tuple[dict[int, str], dict[str, int], dict[int, str]]:
    """Channel count from the first image, label values from every label map, and for each channel
    the evidence of its modality. The channel is CT when most images show Hounsfield air
    (segplan.planner.intensity.infer_ct: the windowed or HU + 1024 look alone is also MRI's), looked at in
    up to PLAIN_CT_SAMPLE images spread over the cases: one odd first image must not decide."""
    from segplan.planner.intensity import detect_convention, infer_ct
    first = sitk.ReadImage(str(cases[0].image_files[0]))
    n_comp = first.GetNumberOfComponentsPerPixel()
    if n_comp == 1:
        picks = sorted({round(i * (len(cases) - 1) / max(PLAIN_CT_SAMPLE - 1, 1)) for i in range(PLAIN_CT_SAMPLE)})
        looks = [detect_convention(sitk.GetArrayFromImage(sitk.ReadImage(str(cases[i].image_files[0]))), True)
                 for i in picks if Path(cases[i].image_files[0]).exists()]
        looks_ct, why = infer_ct(looks)
    else:
        looks_ct, why = False, f"{n_comp} components per voxel (a CT has one)"
    channels = {c: ("CT" if looks_ct else f"channel{c}") for c in range(n_comp)}
    evidence = {c: why for c in range(n_comp)}
    values: set[int] = set()
    for case in cases:
        if case.label_file is not None and case.label_file.exists():
            values |= {int(v) for v in np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(case.label_file))))}
    values.add(0)
    labels = {"background": 0} | {f"label_{v}": v for v in sorted(values) if v != 0}
    return channels, labels, evidence


def _write_plain_meta(ds: Dataset, path: Path) -> None:
    text = ("# Inferred by segplan from the files: edit the names freely; values must match the label maps.\n"
            "# A channel named CT is read as CT (each case's unit detected: HU, 0..255 windowed, HU + 1024);\n"
            "# any other name is normalised per case (z-score over the non-zero region, as MRI).\n"
            + yaml.safe_dump({"channel_names": {int(k): v for k, v in ds.channel_names.items()},
                              "labels": ds.labels}, sort_keys=False)
            + "# what segplan saw when it named the channels (a renamed channel counts as declared by you)\n"
            + yaml.safe_dump({INFERRED_KEY: {int(c): {"name": ds.channel_names[c], "evidence": e}
                                             for c, e in ds.channel_evidence.items()}}, sort_keys=False, width=1000))
    if not os.stat(path.parent).st_mode & stat.S_IWUSR:
        return  # a read-only dataset folder (even for root): the inferred values are used in memory only
    try:
        write_text(path, text)
    except OSError:
        return  # unwritable all the same: the inferred values are used in memory only
