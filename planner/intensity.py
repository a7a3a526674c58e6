"""Intensity rules shared by the planner and preprocessing: CT conventions decided by evidence, the
map to HU, and the crop box of the non-zero region.

COVID-19-CT-Seg mixes CTs in Hounsfield units with Radiopaedia cases already windowed to
[-1250, 250] HU and scaled to 0..255; other archives store unsigned HU + 1024. Pooling or clipping
them as one unit silently corrupts the statistics and the input, so each case is named by what its
values show, and a case that shows none of the signatures is 'unknown' (reported, never guessed
quietly):

- ``hu``: evidence of air, a low percentile below -500 (air is about -1000 HU);
- ``windowed``: whole numbers within 0..255 with the windowed look: air near 0 (low percentile
  <= 64: -1000 HU in the paper's window is 42) and the window's top reached (max >= 250: bone and
  contrast saturate);
- ``shifted_hu``: whole numbers with the minimum near 0 (0..50), air low (low percentile < 100:
  -1000 HU stored as 24) and soft tissue far above 255 (max > 1000: water is stored as 1024);
- ``unknown``: anything else, e.g. a windowed case stored as 0..1 floats or padded with -1, an HU
  volume cropped to soft tissue (0..200), a CT with no air in view.
"""
from __future__ import annotations

import numpy as np

DEFAULT_WINDOW = (-1250.0, 250.0)
CONVENTIONS = ("hu", "windowed", "shifted_hu", "unknown", "other")
HU_AIR_BELOW = -500.0       # a low percentile below this is evidence of air in HU
WINDOWED_AIR_AT_MOST = 64.0  # windowed air (-1000 HU) lies near 0 on the 0..255 scale
WINDOWED_TOP_AT_LEAST = 250.0
SHIFT = 1024.0               # unsigned HU: stored = HU + 1024
SHIFTED_MIN_AT_MOST = 50.0
SHIFTED_AIR_BELOW = 100.0
SHIFTED_MAX_ABOVE = 1000.0
LOW_PERCENTILE = 0.5
SAMPLE = 1_000_000           # voxels looked at for the percentile (a strided sample of the volume)


def _evidence(arr: np.ndarray) -> tuple[float, float, float, bool]:
    """(min, max, low percentile, whole numbers) of a volume, from a strided sample for the percentile."""
    flat = np.asarray(arr).ravel()
    sample = flat[:: max(1, flat.size // SAMPLE)].astype(np.float32)
    whole = flat.dtype.kind in "iub" or bool(np.all(sample == np.round(sample)))
    return float(flat.min()), float(flat.max()), float(np.percentile(sample, LOW_PERCENTILE)), whole


def detect_convention(arr: np.ndarray, is_ct: bool) -> str:
    """'hu', 'windowed', 'shifted_hu' or 'unknown' for a CT channel (rules in the module doc);
    'other' for a channel that is not CT."""
    return explain_convention(arr, is_ct)[0]


def explain_convention(arr: np.ndarray, is_ct: bool) -> tuple[str, str]:
    """The convention and the evidence for it, in words (for check-dataset and the plan)."""
    if not is_ct:
        return "other", "not a CT channel"
    lo, hi, low, whole = _evidence(arr)
    seen = f"min {lo:g}, max {hi:g}, {LOW_PERCENTILE:g}th percentile {low:g}"
    if low < HU_AIR_BELOW:
        return "hu", f"air below {HU_AIR_BELOW:g} ({seen})"
    if whole and lo >= 0 and hi <= 255 and low <= WINDOWED_AIR_AT_MOST and hi >= WINDOWED_TOP_AT_LEAST:
        return "windowed", f"whole numbers in 0..255, air near 0, window top reached ({seen})"
    if whole and 0 <= lo <= SHIFTED_MIN_AT_MOST and low < SHIFTED_AIR_BELOW and hi > SHIFTED_MAX_ABOVE:
        return "shifted_hu", f"unsigned HU + {SHIFT:g}: minimum near 0, tissue above {SHIFTED_MAX_ABOVE:g} ({seen})"
    why = "not whole numbers" if not whole else "no air below -500 HU and not the 0..255 windowed look"
    return "unknown", f"{why} ({seen})"


def infer_ct(looks: list[str]) -> tuple[bool, str]:
    """Whether a channel whose name nobody declared (the plain layout) is CT, and from what, given
    the convention each sampled image of it shows (``detect_convention(arr, True)``).

    CT only when most images show Hounsfield evidence (air below -500). The windowed and shifted
    looks are not enough: an int16 MRI (background exactly 0, tissue up to ~1800) has the
    HU + 1024 look, and an 8-bit one the 0..255 look. A channel taken for non-CT that is CT is
    declared so in dataset.yaml; its cases' units are then detected one by one as for any CT."""
    hu = looks.count("hu")
    seen = (f"{hu} of {len(looks)} sampled images show Hounsfield air "
            f"({LOW_PERCENTILE:g}th percentile below {HU_AIR_BELOW:g})")
    if looks and hu * 2 > len(looks):
        return True, seen
    other = sum(look in ("windowed", "shifted_hu") for look in looks)
    if other:
        seen += (f"; {other} look windowed (0..255) or unsigned (HU + {SHIFT:g}), which MRI stored as integers "
                 "also does: not enough for CT")
    return False, seen


def to_hu(arr: np.ndarray, convention: str, window=DEFAULT_WINDOW) -> np.ndarray:
    """Bring a CT channel into HU: windowed v in 0..255 -> lo + v / 255 * (hi - lo); shifted v -> v - 1024;
    'hu' and 'unknown' (assumed HU, as the plan says) unchanged."""
    if convention == "windowed":
        lo, hi = window
        return arr.astype(np.float32) * np.float32((hi - lo) / 255.0) + np.float32(lo)
    if convention == "shifted_hu":
        return arr.astype(np.float32) - np.float32(SHIFT)
    return arr


def nonzero_box(image, ct_channels: list[bool]) -> tuple[tuple[int, int], ...]:
    """Bounding box (z, y, x) of voxels non-zero in any non-CT channel; the whole volume if all CT.
    ``image`` is a (c, z, y, x) array or a list of (z, y, x) channels."""
    shape = image[0].shape
    masks = [image[c] != 0 for c in range(len(image)) if not ct_channels[c]]
    if not masks:
        return tuple((0, s) for s in shape)
    mask = np.logical_or.reduce(masks)
    if not mask.any():
        return tuple((0, s) for s in shape)
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        nz = np.flatnonzero(mask.any(axis=other))
        box.append((int(nz[0]), int(nz[-1]) + 1))
    return tuple(box)
