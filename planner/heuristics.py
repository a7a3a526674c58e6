"""Pure rules that turn a fingerprint into a plan: spacing, topology, patch/batch fit, normalisation.

Every rule records why it chose its value in ``reasons`` (dotted plan key -> text); the plan YAML
prints them as comments.
"""
from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import numpy as np

from segplan.planner.memory import estimate_training_gb
from segplan.planner.plan import NetworkSection

if TYPE_CHECKING:  # the rules need no image I/O: SimpleITK stays out of their imports
    from segplan.planner.fingerprint import Fingerprint

MAX_POOLS = 5
MIN_STAGE_VOXELS = 4
FIRST_FILTERS = 32
MAX_FILTERS = 512
MAX_BATCH_SHARE = 0.05
MIN_BATCH = 2
MIN_PATCH = 8        # no axis of a patch is shrunk below this (or below the median image, if smaller)
# residual blocks per encoder stage of nnU-Net's ResEnc presets (residual_encoder_unet_planners.py,
# UNet_blocks_per_stage_encoder), cut to the network's stages
RESENC_BLOCKS = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6)
# the network the rules size when none is given: the paper's plain U-Net
PLAIN_NETWORK = NetworkSection([], [], [], 2, "batch", 0.99, "relu", "transpose")
# the network of nnU-Net's ResEnc presets: residual encoder, one convolution per decoder stage,
# leaky ReLU, deep supervision (segplan's batch norm where nnU-Net has instance norm)
RESENC_NETWORK = NetworkSection([], [], [], 1, "batch", 0.99, "leaky_relu", "transpose", "residual_encoder", [], True)


def target_spacing(spacings: np.ndarray, reasons: dict) -> list[float]:
    """Median per axis; an axis over 3x coarser than the others takes its 10th percentile."""
    med = np.median(spacings, axis=0)
    target = med.copy()
    worst = int(np.argmax(med))
    others = [a for a in range(3) if a != worst]
    why = f"median of {len(spacings)} cases"
    if med[worst] > 3 * max(med[others]):
        target[worst] = max(np.percentile(spacings[:, worst], 10), max(med[others]))
        why += f"; axis {'zyx'[worst]} is anisotropic (>3x), so its 10th percentile"
    reasons["resampling.target_spacing"] = why
    return [round(float(s), 4) for s in target]


def topology(patch: list[int], spacing: list[float]) -> tuple[list[list[int]], list[list[int]]]:
    """Pool sizes and kernel sizes (per axis of the patch: 3, or a 2d plan's 2): pool an axis while it stays >= 4 voxels and its spacing is within
    2x of the finest; 1-voxel kernels along an axis still over 2x coarser than the finest."""
    size, sp = list(patch), list(spacing)
    kernels = [[1 if s > 2 * min(sp) else 3 for s in sp]]
    pools: list[list[int]] = []
    while len(pools) < MAX_POOLS:
        finest = min(sp)
        pool = [2 if (size[a] // 2 >= MIN_STAGE_VOXELS and sp[a] <= 2 * finest) else 1 for a in range(len(size))]
        if not any(p == 2 for p in pool):
            break
        size = [s // p for s, p in zip(size, pool)]
        sp = [s * p for s, p in zip(sp, pool)]
        pools.append(pool)
        kernels.append([1 if s > 2 * min(sp) else 3 for s in sp])
    return pools, kernels


def filters_for(n_stages: int, first: int = FIRST_FILTERS, cap: int = MAX_FILTERS) -> list[int]:
    return [min(first * 2 ** i, cap) for i in range(n_stages)]


def shaped(template: NetworkSection, filters: list[int], pools: list[list[int]], kernels: list[list[int]]
           ) -> NetworkSection:
    """``template``'s kind of network (architecture, convolutions, deep supervision) with this topology;
    a residual encoder gets nnU-Net's blocks per stage for its number of stages."""
    residual = template.architecture == "residual_encoder"
    blocks = [RESENC_BLOCKS[min(s, len(RESENC_BLOCKS) - 1)] for s in range(len(filters))] if residual else []
    return dataclasses.replace(template, filters=list(filters), pool_sizes=[list(p) for p in pools],
                               kernel_sizes=[list(k) for k in kernels], blocks_per_stage=blocks)


def _divisible(patch: list[int], pools: list[list[int]], down_to: list[float] | None = None) -> list[int]:
    """Each axis a multiple of its total pooling: rounded up, or down where ``down_to`` is given and
    the multiple below is still at least ``down_to`` on that axis (and one pooling multiple)."""
    div = [math.prod(p[a] for p in pools) for a in range(len(patch))]
    up = [max(d, int(math.ceil(s / d)) * d) for s, d in zip(patch, div)]
    if down_to is None:
        return up
    return [s // d * d if s // d * d >= max(d, lo) else u for s, d, u, lo in zip(patch, div, up, down_to)]


def _can_shrink(patch: list[int], pools: list[list[int]], floor: list[int]) -> list[bool]:
    """Axes that can lose one pooling multiple and stay at or above their floor."""
    div = [math.prod(p[a] for p in pools) for a in range(len(patch))]
    return [patch[a] - div[a] >= floor[a] for a in range(len(patch))]


def fit_patch_and_batch(median_shape: list[float], spacing: list[float], budget_gb: float, in_channels: int,
                        n_classes: int, dataset_voxels: float, reasons: dict, first: int = FIRST_FILTERS,
                        cap: int = MAX_FILTERS, mixed_precision: bool = False, network: NetworkSection = PLAIN_NETWORK,
                        min_batch: int = MIN_BATCH, max_batch_share: float = MAX_BATCH_SHARE,
                        min_cover: float | None = None) -> dict:
    """nnU-Net's rule: a patch proportional to the median image in mm, shrunk along the axis largest
    relative to the median shape until the estimate fits ``budget_gb``; the rest goes to the batch,
    which covers at most ``max_batch_share`` of the dataset's voxels. ``network`` is the kind of
    network sized (its topology is the rules'); the fitted one is returned as ``network``.
    ``min_cover`` (CPU plans): the median is rounded down to the pooling, not up, on every axis where
    the patch still covers at least this share of it (padding costs step time and teaches nothing).

    Always ends: every step takes one pooling multiple off an axis that stays at or above its floor
    (MIN_PATCH voxels, or the median where that is smaller), so the patch strictly shrinks. When even
    the smallest patch does not fit, the plan is that smallest patch and says so in ``reasons``
    (key ``memory.estimate_gb``) and in the returned ``fits``."""
    median_up = [max(int(math.ceil(m)), 1) for m in median_shape]
    floor = [min(m, MIN_PATCH) for m in median_up]
    patch = list(median_up)   # proportional to the median image in mm

    def estimate(p, pools, kernels, filters, batch):
        return estimate_training_gb(shaped(network, filters, pools, kernels), p, batch, in_channels, n_classes,
                                    mixed_precision)
    while True:
        pools, kernels = topology(patch, spacing)
        patch = _divisible(patch, pools, None if min_cover is None else [min_cover * m for m in median_shape])
        filters = filters_for(len(pools) + 1, first, cap)
        est = estimate(patch, pools, kernels, filters, min_batch)
        movable = _can_shrink(patch, pools, floor)
        if est <= budget_gb or not any(movable):
            break
        rel = [p / m if ok else -1.0 for p, m, ok in zip(patch, median_shape, movable)]
        axis = int(np.argmax(rel))
        patch[axis] -= math.prod(p[axis] for p in pools)
    one = estimate(patch, pools, kernels, filters, 1)
    per_sample = estimate(patch, pools, kernels, filters, 2) - one
    # the estimate is linear in the batch: solve for it instead of counting up (a tiny patch under a
    # large budget would otherwise take millions of steps)
    batch = max(min_batch, int((budget_gb - (one - per_sample)) / per_sample)) if per_sample > 0 else min_batch
    cap_batch = max(min_batch, int(max_batch_share * dataset_voxels / np.prod(patch)))
    why_batch = f"fills the {budget_gb:g} GB budget"
    if batch > cap_batch:
        batch, why_batch = cap_batch, f"capped so one batch covers at most {max_batch_share:.0%} of the dataset's voxels"
    est = estimate(patch, pools, kernels, filters, batch)
    fits = est <= budget_gb
    if batch == min_batch and not fits:
        why_batch = f"the minimum of {min_batch}"
    reasons["training.patch_size"] = (f"median image {[round(m) for m in median_shape]} voxels at target spacing; "
                                      f"shrunk to fit {budget_gb:g} GB and made divisible by the pooling")
    reasons["training.batch_size"] = f"{why_batch}; about {per_sample:.2f} GB per extra sample"
    reasons["network.pool_sizes"] = "pool an axis while it stays >= 4 voxels and its spacing is within 2x of the finest"
    reasons["network.filters"] = f"{first} doubling per stage, capped at {cap}"
    if not fits:
        reasons["memory.estimate_gb"] = (f"DOES NOT FIT: even the smallest patch the rules allow ({patch} x batch "
                                         f"{batch}) needs {est:.2f} GB of the {budget_gb:g} GB budget; give more memory "
                                         "(--gpu-memory) or a narrower network")
    return {"patch": patch, "batch": batch, "pools": pools, "kernels": kernels, "filters": filters, "estimate": est,
            "fits": fits, "network": shaped(network, filters, pools, kernels)}


def ct_normalization(stats, reasons: dict, index: int) -> dict:
    reasons[f"intensity.normalization.{index}.clip"] = "foreground percentiles 0.5 / 99.5 in HU"
    lo, hi = stats.p00_5, stats.p99_5
    return {"channel": stats.name, "scheme": "ct", "clip": [round(lo, 1), round(hi, 1)], "zscore": "dataset",
            "mean": round(stats.mean, 3), "std": round(max(stats.std, 1e-3), 3)}


def median_resampled_shape(fp: Fingerprint, spacing: list[float]) -> list[float]:
    shapes = np.array([np.array(c.cropped_shape) * np.array(c.spacing) / np.array(spacing) for c in fp.cases])
    return [float(v) for v in np.median(shapes, axis=0)]


def case_voxels(fp: Fingerprint, spacing: list[float]) -> list[float]:
    """Voxels of each case's (cropped) image at ``spacing``."""
    return [float(np.prod(np.array(c.cropped_shape) * np.array(c.spacing) / np.array(spacing))) for c in fp.cases]


def dataset_voxels(fp: Fingerprint, spacing: list[float]) -> float:
    return sum(case_voxels(fp, spacing))


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start positions along one axis: step = patch x (1 - overlap), spread to cover [0, size) exactly."""
    if size <= patch:
        return [0]
    step = max(1, int(patch * (1.0 - overlap)))
    n = int(np.ceil((size - patch) / step)) + 1
    return [int(round(i * (size - patch) / (n - 1))) for i in range(n)]


def window_count(shape: list[float], patch: list[int], overlap: float) -> int:
    """Sliding windows that cover a volume of ``shape`` (what predicting it costs, in network calls)."""
    return math.prod(len(window_starts(int(round(s)), p, overlap)) for s, p in zip(shape, patch))
