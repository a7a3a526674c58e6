"""Regions and unannotated voxels at run time, in one place (plain numpy): what a region plan's
targets are, how its sigmoid outputs become one label map again, what evaluation and
postprocessing score, and which voxels of a reference count.

A region plan (``dataset.regions``, nnU-Net's region-based training) has one sigmoid output per
region; a voxel is in a region when its label value is one of the region's. Back to one integer
label map as nnU-Net's LabelManager.convert_probabilities_to_segmentation: start from background,
then for each region in order write its ``regions_class_order`` value where its probability
exceeds 0.5, later regions overwriting earlier ones. The ignore label (``dataset.ignore_label``)
is no class: the preprocessed label maps carry it as class index K (one past the labels), it is
in no region, and it is never written into a prediction.
"""
from __future__ import annotations

import numpy as np

THRESHOLD = 0.5   # a region is predicted where its sigmoid probability exceeds this (nnU-Net)


def region_table(labels: dict[str, int], regions: dict[str, list[int]]) -> np.ndarray:
    """(K + 1, R) float32: 1 where class index k (the order of ``labels``) lies in region r; the
    last row, class index K, is the ignore label's, in no region. ``table[seg]`` is the region
    target of a class-index map."""
    values = list(labels.values())
    table = np.zeros((len(values) + 1, len(regions)), np.float32)
    for r, members in enumerate(regions.values()):
        for k, v in enumerate(values):
            table[k, r] = v in members
    return table


def regions_to_labels(probabilities: np.ndarray, order: list[int], dtype=np.uint8) -> np.ndarray:
    """(R, ...) region probabilities -> one label map: ``order[r]`` written where region r's
    probability exceeds 0.5, region by region, later over earlier; 0 where none does."""
    out = np.zeros(probabilities.shape[1:], dtype)
    for p, value in zip(probabilities, order):
        out[p > THRESHOLD] = value
    return out


def structures(labels: dict[str, int], regions: dict[str, list[int]] | None = None) -> dict[str, list[int]]:
    """What is scored and postprocessed, name -> label values: each region of a region plan, else
    each foreground label on its own."""
    if regions:
        return {name: list(values) for name, values in regions.items()}
    return {name: [value] for name, value in labels.items() if value != 0}


def mask_of(label_map: np.ndarray, values: list[int]) -> np.ndarray:
    """Voxels whose label is one of ``values``."""
    return label_map == values[0] if len(values) == 1 else np.isin(label_map, values)


def annotated(reference: np.ndarray, ignore_label: int | None) -> np.ndarray | None:
    """The voxels of a reference someone annotated (not the ignore label); None: all of them."""
    return None if ignore_label is None else reference != ignore_label
