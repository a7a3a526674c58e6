"""Dataset fingerprint: what the planner needs to know, read once and cached as YAML.

CT intensities are compared in one common unit, Hounsfield units: a case stored windowed to
0..255 (COVID-19-CT-Seg's Radiopaedia cases) is detected from its values and mapped back to HU
with the window before any statistic is taken, so the two conventions never get pooled.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from segplan.planner.dataset import Dataset, read_label, read_volume
from segplan.planner.layouts import load_dataset
from segplan.planner.fileio import write_text
from segplan.planner.intensity import DEFAULT_WINDOW, detect_convention, nonzero_box, to_hu
from segplan.planner.parallel import parallel_map
from segplan.planner.schema import Reader, SchemaError, doc, dump_yaml

FINGERPRINT_VERSION = 3    # 2: conventions by evidence (hu, windowed, shifted_hu, unknown); 3: channel sources
SAMPLES_PER_CASE = 10_000


@dataclass(frozen=True)
class CaseFingerprint:
    case_id: str = doc("case id")
    spacing: list[float] = doc("mm (z, y, x)")
    shape: list[int] = doc("voxels (z, y, x)")
    cropped_shape: list[int] = doc("shape of the non-zero region (non-CT channels; CT volumes are not cropped)")
    direction: list[float] = doc("direction cosines as SimpleITK reports them")
    conventions: list[str] = doc("per channel: hu, windowed (0..255), shifted_hu (HU + 1024), unknown, or other (not CT)")
    class_voxels: list[int] = doc("voxels per label, in the order of the labels")
    ignored_voxels: int = doc("voxels of the ignore label (not annotated; in no class count)", default=0)


@dataclass(frozen=True)
class ChannelStats:
    name: str = doc("channel name")
    is_ct: bool = doc("statistics in HU")
    mean: float = doc("foreground mean")
    std: float = doc("foreground std")
    min: float = doc("foreground minimum")
    max: float = doc("foreground maximum")
    p00_5: float = doc("0.5th percentile")
    p50: float = doc("median")
    p99_5: float = doc("99.5th percentile")
    samples: int = doc("foreground voxels sampled")
    source: str = doc("CT or not, and from what: the name in dataset.json / dataset.yaml, or segplan's inference "
                      "from the files", default="")


@dataclass(frozen=True)
class Fingerprint:
    version: int = doc("fingerprint format")
    source_key: str = doc("hash of file names, sizes and times: a change means re-fingerprint")
    channel_names: list[str] = doc("channels")
    labels: dict[str, int] = doc("labels")
    windowed_range: list[float] = doc("HU window assumed for windowed CT cases")
    cases: list[CaseFingerprint] = doc("per case")
    channels: list[ChannelStats] = doc("per channel")
    class_ratio: list[float] = doc("share of the annotated voxels per label (the ignore label's are not counted)")
    class_presence: list[int] = doc("cases containing each label")
    seed: int = field(default=0, metadata={"doc": "seed of the foreground sample"})
    regions: dict[str, list[int]] = doc("region name -> label values (dataset.json's list-valued labels)",
                                        default_factory=dict)
    regions_class_order: list[int] = doc("label value written per region, in order", default_factory=list)
    ignore_label: int | None = doc("value of unannotated voxels: left out of class_ratio and of the intensity "
                                   "sample; null: none", default=None)


def _case_stats(args):
    """One case: geometry, conventions, non-zero box, class voxel counts and a foreground sample.
    Works on the arrays as stored (no float copy of the volume, no bincount): only the sampled voxels are
    converted to float32 and, for CT, to HU."""
    case, idx, seed, ct_flags, label_values, window, ignore = args
    channels, geom = [], None
    for path in case.image_files:
        arr, g = read_volume(path)
        geom = geom or g
        channels.extend(list(arr) if arr.ndim == 4 else [arr])
    conventions = [detect_convention(ch, ct_flags[c]) for c, ch in enumerate(channels)]
    box = nonzero_box(channels, ct_flags)
    label, _ = read_label(case.label_file)
    flat = label.ravel()
    # one comparison pass per label is far cheaper than bincount's int64 copy of the volume
    counts = [int(np.count_nonzero(flat == v)) for v in label_values]
    ignored = int(np.count_nonzero(flat == ignore)) if ignore is not None else 0
    # the intensity sample comes from annotated foreground only: unannotated voxels are any tissue
    fg = (np.flatnonzero((flat > 0) & (flat != ignore) if ignored else flat > 0)
          if len(label_values) > 1 else None)
    rng = np.random.default_rng([seed, idx])
    if fg is None:
        pick = rng.integers(0, flat.size, size=min(SAMPLES_PER_CASE, flat.size))
    else:
        pick = fg[rng.integers(0, fg.size, size=min(SAMPLES_PER_CASE, fg.size))] if fg.size else fg
    samples = []
    for c, ch in enumerate(channels):
        vals = ch.ravel()[pick].astype(np.float32)
        samples.append(to_hu(vals, conventions[c], window) if ct_flags[c] else vals)
    cfp = CaseFingerprint(case.case_id, list(geom.spacing), list(geom.shape),
                          [b - a for a, b in box], list(geom.direction), conventions, counts, ignored)
    return cfp, samples


def source_key(ds: Dataset) -> str:
    """A hash of the case files' names, sizes and times and of the channels and labels: renaming a
    channel CT in dataset.yaml (or back) must re-read the cases in its unit."""
    h = hashlib.sha1()
    extra = [ds.regions, ds.regions_class_order, ds.ignore_label] if ds.regions or ds.ignore_label is not None else []
    h.update(json.dumps([ds.channel_names, ds.labels, ds.channel_evidence, *extra], sort_keys=True).encode())
    for c in ds.cases:
        for p in (*c.image_files, c.label_file):
            st = os.stat(p)
            h.update(f"{p.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def compute_fingerprint(ds: Dataset, workers: int = 1, seed: int = 0, window=DEFAULT_WINDOW,
                        progress: bool = True) -> Fingerprint:
    """Read every case once (``workers`` at a time) and summarise it."""
    ct_flags = [ds.is_ct(c) for c in range(ds.num_channels)]
    label_values = list(ds.labels.values())
    results = parallel_map(_case_stats, [(c, i, seed, ct_flags, label_values, window, ds.ignore_label)
                                         for i, c in enumerate(ds.cases)],
                           workers, desc="fingerprint", progress=progress)
    cases = [r[0] for r in results]
    channels = []
    for c in range(ds.num_channels):
        vals = np.concatenate([r[1][c] for r in results]) if results else np.zeros(1, np.float32)
        vals = vals if vals.size else np.zeros(1, np.float32)
        p = np.percentile(vals, [0.5, 50, 99.5])
        channels.append(ChannelStats(ds.channel_names[c], ct_flags[c], float(vals.mean()), float(vals.std()),
                                     float(vals.min()), float(vals.max()), float(p[0]), float(p[1]), float(p[2]),
                                     int(vals.size), ds.channel_source(c)))
    counts = np.array([cf.class_voxels for cf in cases], dtype=np.int64)
    total = max(int(counts.sum()), 1)
    return Fingerprint(FINGERPRINT_VERSION, source_key(ds), [ds.channel_names[c] for c in range(ds.num_channels)],
                       dict(ds.labels), list(window), cases, channels,
                       [float(v) for v in counts.sum(0) / total], [int(v) for v in (counts > 0).sum(0)], seed,
                       {k: list(v) for k, v in ds.regions.items()}, list(ds.regions_class_order), ds.ignore_label)


def save_fingerprint(fp: Fingerprint, path: Path) -> None:
    write_text(path, dump_yaml(fp, header="segplan dataset fingerprint (a cache: delete it to recompute)"))


def load_fingerprint(path: Path) -> Fingerprint:
    data = yaml.safe_load(Path(path).read_text())
    reader = Reader(str(path), {})
    fp = reader.build(Fingerprint, data)
    if reader.errors:
        raise SchemaError(reader.errors)
    return fp


def fingerprint_for(dataset_dir: Path, cache: Path, workers: int = 1, progress: bool = True) -> tuple[Fingerprint, bool]:
    """The cached fingerprint if it matches the files, else a new one (saved). Returns (fp, from_cache)."""
    ds = load_dataset(dataset_dir)
    key = source_key(ds)
    if cache.exists():
        try:
            fp = load_fingerprint(cache)
            if fp.source_key == key and fp.version == FINGERPRINT_VERSION:
                return fp, True
        except (SchemaError, yaml.YAMLError, TypeError):
            pass  # a stale or damaged cache is simply recomputed
    fp = compute_fingerprint(ds, workers=workers, progress=progress)
    save_fingerprint(fp, cache)
    return fp, False
