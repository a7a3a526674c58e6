"""Training targets: one-hot labels, and with deep supervision one target per supervised level,
the labels down-sampled to that level's resolution. Plain numpy, nothing else imported: the
training batches, the probe and the memory calibration all make their targets here."""
from __future__ import annotations

import numpy as np

from planner.plan import SupervisedLevel


def downsample_labels(seg: np.ndarray, factors: list[int]) -> np.ndarray:
    """Labels (..., z, y, x) at 1/factor of the resolution per axis, nearest: voxel f * i + f // 2 of
    each block of f, which is what nnU-Net's deep-supervision targets take (batchgeneratorsv2
    DownsampleSegForDSTransform: torch's 'nearest-exact', source index floor((i + 0.5) f)). The
    patch is a multiple of the factors, so every output voxel has its whole block."""
    return seg[(Ellipsis, *(slice(f // 2, None, f) for f in factors))]


def one_hot(seg: np.ndarray, n_classes: int) -> np.ndarray:
    return np.eye(n_classes, dtype=np.float32)[np.clip(seg, 0, n_classes - 1)]


def targets(seg: np.ndarray, n_classes: int, levels: list[SupervisedLevel] | None = None):
    """One-hot targets of a (b, z, y, x) label batch: one array, or with several supervised levels
    a tuple, one per level (the model's outputs, full resolution first)."""
    if not levels or len(levels) == 1:
        return one_hot(seg, n_classes)
    return tuple(one_hot(downsample_labels(seg, lv.factors), n_classes) for lv in levels)
