"""Training targets: one-hot labels, and with deep supervision one target per supervised level,
the labels down-sampled to that level's resolution. Plain numpy, nothing else imported: the
training batches, the probe and the memory calibration all make their targets here.

A region plan's target is one mask per region (segplan.planner.labels.LabelModel.region_table) instead
of the one-hot labels. The class indices are down-sampled first and turned into region masks
after: nearest down-sampling picks one voxel per block, so that is exactly each region mask
down-sampled nearest (nnU-Net converts to regions first, then down-samples each channel with
nearest-exact). With an ignore label (class index K, one past the labels), the one-hot / region channels
are 0 on its voxels and one more channel, last, is 1 where the voxel is annotated: the loss's
mask (nnU-Net appends the ignore channel likewise)."""
from __future__ import annotations

import numpy as np

from segplan.planner.labels import LabelModel
from segplan.planner.plan import SupervisedLevel


def downsample_labels(seg: np.ndarray, factors: list[int]) -> np.ndarray:
    """Labels (..., z, y, x) at 1/factor of the resolution per axis, nearest: voxel f * i + f // 2 of
    each block of f, which is what nnU-Net's deep-supervision targets take (batchgeneratorsv2
    DownsampleSegForDSTransform: torch's 'nearest-exact', source index floor((i + 0.5) f)). The
    patch is a multiple of the factors, so every output voxel has its whole block."""
    return seg[(Ellipsis, *(slice(f // 2, None, f) for f in factors))]


def one_hot(seg: np.ndarray, n_classes: int) -> np.ndarray:
    """float32 one-hot of class indices along a new last axis (indices past the classes clipped);
    a comparison, 30% cheaper than indexing an identity matrix."""
    return (np.clip(seg, 0, n_classes - 1)[..., None] == np.arange(n_classes)).astype(np.float32)


def encode(seg: np.ndarray, lm: LabelModel) -> np.ndarray:
    """One level's target of a class-index map: one-hot, or a region plan's region masks; with an
    ignore label, its class index K is unannotated: zero in every channel, and an annotated-mask
    channel is appended."""
    n_classes = lm.n_classes
    regions = lm.region_table() if lm.has_regions else None
    if not lm.has_ignore:
        return one_hot(seg, n_classes) if regions is None else regions[seg]
    annotated = seg != n_classes
    y = (regions[seg] if regions is not None
         else one_hot(np.where(annotated, seg, 0), n_classes) * annotated[..., None])
    return np.concatenate([y, annotated[..., None].astype(np.float32)], axis=-1)


def targets(seg: np.ndarray, lm: LabelModel, levels: list[SupervisedLevel] | None = None):
    """One-hot (or region, see ``encode``) targets of a (b, z, y, x) label batch: one array, or with
    several supervised levels a tuple, one per level (the model's outputs, full resolution first)."""
    if not levels or len(levels) == 1:
        return encode(seg, lm)
    return tuple(encode(downsample_labels(seg, lv.factors), lm) for lv in levels)
