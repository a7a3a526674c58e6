"""nnU-Net's configuration family as geometry: the spacing a configuration resamples to, the axes
its patch spans and the median image it is sized for, and whether a low-resolution stage applies.

- ``2d``: the 3d_fullres target spacing; the volume is cut into slices along its coarsest axis
  (nnU-Net's transpose puts that axis first and slices along it; the first axis on ties), and the
  patch, batch and network are sized for the other two axes (the median image's in-plane shape),
  the batch capped at 5% of the dataset's voxels as in 3D.
- ``3d_fullres``: the target spacing and the median image.
- ``3d_lowres``: where the 3d_fullres patch covers less than a quarter of the median image's
  voxels, the spacing is raised 3% a step (the axes over 2x finer than the coarsest first, then
  all of them) and the patch re-fitted at each step, until it covers a quarter of the median image
  at that spacing; dropped when that image is not at least 2x smaller than at full resolution
  (nnU-Net v2 ``ExperimentPlanner.plan_experiment``: lowres_creation_threshold 0.25, spacing
  increase factor 1.03, "image size difference too small" below 2).
- ``3d_cascade_fullres``: 3d_fullres with the 3d_lowres prediction as extra input channels
  (segplan.planner.plan.cascade_channels), which the fit counts; planned only beside a 3d_lowres plan.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import numpy as np

from segplan.planner import heuristics as H

if TYPE_CHECKING:  # no image I/O in the rules
    from segplan.planner.fingerprint import Fingerprint

LOWRES_COVERAGE = 0.25      # nnU-Net's lowres_creation_threshold
LOWRES_SPACING_STEP = 1.03  # nnU-Net's spacing_increase_factor
LOWRES_MIN_SHRINK = 2.0     # a low-resolution median image at least this many times fewer voxels, or no stage
MAX_LOWRES_STEPS = 10_000   # never reached: the median image shrinks every step until the patch covers it

# fit(spacing, median shape, dataset voxels) -> heuristics.fit_patch_and_batch's result
Fit = Callable[[list[float], list[float], float], dict]


class NotApplicable(ValueError):
    """The dataset does not call for this configuration (a low-resolution stage where the full-
    resolution patch covers enough of the median image, or where it would hardly be smaller).
    ``short``: the reason without the figures a 3d_fullres plan's comment gives already."""

    def __init__(self, message: str, short: str):
        super().__init__(message)
        self.short = short


def slice_axis(spacing: list[float]) -> int:
    """The axis a 2d plan slices along: the coarsest of the target spacing (the first on ties)."""
    return int(np.argmax(spacing))


def in_plane(values: list, axis: int) -> list:
    """``values`` (one per axis z, y, x) without the slice axis, in (z, y, x) order."""
    return [v for a, v in enumerate(values) if a != axis]


def coverage(patch: list[int], median: list[float]) -> float:
    """Share of the median image's voxels one patch covers (above 1 when the patch is larger)."""
    return math.prod(patch) / max(math.prod(median), 1e-12)


def size(configuration: str, fp: Fingerprint, spacing: list[float], fit: Fit, reasons: dict
         ) -> tuple[list[float], int | None, dict]:
    """(target spacing, slice axis or None, fitted patch/batch/network) of ``configuration``, given
    the 3d_fullres target ``spacing``; raises NotApplicable for a 3d_lowres the rule does not call for."""
    median = H.median_resampled_shape(fp, spacing)
    voxels = H.dataset_voxels(fp, spacing)
    if configuration == "2d":
        axis = slice_axis(spacing)
        shown = ", ".join(f"{'zyx'[a]} {s:g}" for a, s in enumerate(spacing))
        tie = "; all equal, so the first" if len(set(spacing)) == 1 else ""
        reasons["slice_axis"] = (f"{'zyx'[axis]}, the coarsest axis of the target spacing ({shown} mm{tie}): the 2D "
                                 f"network sees ({', '.join(in_plane(list('zyx'), axis))}) slices, as nnU-Net's 2d")
        reasons["configuration"] = ("2d: slices of the preprocessed volumes, predicted slice by slice and put back "
                                    "on the original 3D grid")
        reasons["resampling.target_spacing"] = (reasons.get("resampling.target_spacing", "") + "; the 3d_fullres "
                                                "spacing, the slice axis included (nnU-Net's 2d keeps each case's "
                                                "own slice spacing)")
        return spacing, axis, fit(in_plane(spacing, axis), in_plane(median, axis), voxels)
    full = fit(spacing, median, voxels)
    if configuration != "3d_lowres":
        reasons["configuration"] = _fullres_why(configuration, full["patch"], median)
        return spacing, None, full
    low, fitted, med, steps = lowres_search(spacing, median, voxels, full, fit)
    reasons["configuration"] = (f"3d_lowres: the 3d_fullres patch {full['patch']} covers "
                                f"{coverage(full['patch'], median):.1%} of the median image "
                                f"{[round(m) for m in median]} (under {LOWRES_COVERAGE:.0%}, nnU-Net's rule)")
    reasons["resampling.target_spacing"] = (
        f"the 3d_fullres spacing {spacing} raised {LOWRES_SPACING_STEP:g}x per step ({steps} steps; the axes over 2x "
        f"finer than the coarsest first) until the patch covers {LOWRES_COVERAGE:.0%} of the median image: "
        f"{[round(m) for m in med]} voxels here, {math.prod(median) / math.prod(med):.1f}x fewer than at full "
        "resolution (nnU-Net's 3d_lowres)")
    return low, None, fitted


def lowres_search(spacing: list[float], median: list[float], voxels: float, full: dict, fit: Fit
                  ) -> tuple[list[float], dict, list[float], int]:
    """nnU-Net's low-resolution spacing: (spacing, its fit, the median image there, steps taken).
    Raises NotApplicable where the full-resolution patch covers a quarter of the median image
    already, or where the spacing found leaves an image less than 2x smaller."""
    cov = coverage(full["patch"], median)
    if cov >= LOWRES_COVERAGE:
        raise NotApplicable(f"no 3d_lowres: the 3d_fullres patch {full['patch']} covers {cov:.1%} of the median "
                            f"image {[round(m) for m in median]} (at least {LOWRES_COVERAGE:.0%}, nnU-Net's rule)",
                            f"at least {LOWRES_COVERAGE:.0%}: no 3d_lowres stage (nnU-Net's rule)")
    sp = np.array(spacing, float)
    med, fitted = list(median), full
    for steps in range(1, MAX_LOWRES_STEPS + 1):
        fine = sp.max() / sp > 2
        sp = np.round(np.where(fine, sp * LOWRES_SPACING_STEP, sp) if fine.any() else sp * LOWRES_SPACING_STEP, 4)
        ratio = np.array(spacing) / sp
        med = [float(m * r) for m, r in zip(median, ratio)]
        fitted = fit([float(s) for s in sp], med, voxels * float(np.prod(ratio)))
        if coverage(fitted["patch"], med) >= LOWRES_COVERAGE:
            break
    shrink = math.prod(median) / max(math.prod(med), 1e-12)
    if shrink < LOWRES_MIN_SHRINK:
        why = (f"the spacing at which a patch covers {LOWRES_COVERAGE:.0%} ({[float(s) for s in sp]} mm) leaves an "
               f"image only {shrink:.2f}x smaller (under {LOWRES_MIN_SHRINK:g}x: too close to full resolution, "
               "nnU-Net's rule)")
        raise NotApplicable(f"no 3d_lowres: the 3d_fullres patch {full['patch']} covers {cov:.1%} of the median image "
                            f"{[round(m) for m in median]}, but {why}", f"no 3d_lowres stage: {why}")
    return [float(s) for s in sp], fitted, med, steps


def _fullres_why(configuration: str, patch: list[int], median: list[float]) -> str:
    base = (f"the target spacing; its patch {patch} covers {coverage(patch, median):.1%} of the median image "
            f"{[round(m) for m in median]}")
    if configuration == "3d_cascade_fullres":
        return ("3d_cascade_fullres: " + base + "; the 3d_lowres prediction (one-hot, one channel per foreground "
                "class) comes in as extra input channels, counted in the memory estimate")
    return "3d_fullres: " + base


def plan_family(make: Callable[[str], tuple]) -> dict[str, tuple]:
    """Every configuration that applies, each ``make(configuration)`` -> (plan, reasons): 2d and
    3d_fullres always; 3d_lowres and 3d_cascade_fullres where the low-resolution rule calls for them.
    The 3d_fullres plan's comment says why there is no low-resolution stage where there is none.
    The cascade's previous_stage (a file name) is the caller's to set."""
    family = {"2d": make("2d"), "3d_fullres": make("3d_fullres")}
    try:
        family["3d_lowres"] = make("3d_lowres")
    except NotApplicable as e:
        family["3d_fullres"][1]["configuration"] += f"; {e.short}"
        return family
    family["3d_fullres"][1]["configuration"] += (f"; under {LOWRES_COVERAGE:.0%}: a 3d_lowres stage and its "
                                                 "3d_cascade_fullres are planned beside it")
    family["3d_cascade_fullres"] = make("3d_cascade_fullres")
    return family
