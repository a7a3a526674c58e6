"""What a case's quality check is computed from: the input image (is it like the training cases?),
the network's probabilities (how sure was it?) and the predicted volumes (are they plausible?).

The same functions run on a fold's validation cases (written beside the out-of-fold predictions as
``qc_features.csv``, what `segplan summarize` fits the quality model on) and on every new case
`segplan predict` segments, so the model is applied to exactly what it was fitted on.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from segplan.planner.labels import LabelModel, mask_of

SAMPLE_VOXELS = 2_000_000  # image statistics from at most about this many voxels
IMAGE_STATS = ("p01", "p50", "p99", "smoothness")


def _subsampled(channel: np.ndarray) -> np.ndarray:
    """Every s-th voxel along each axis, s chosen so that at most about SAMPLE_VOXELS remain."""
    s = max(1, int(np.ceil((channel.size / SAMPLE_VOXELS) ** (1 / channel.ndim))))
    return channel[(slice(None, None, s),) * channel.ndim]


def smoothness(channel: np.ndarray) -> float:
    """Mean over the axes of the correlation between neighbouring voxels: about 0.5-1 for any image
    of anatomy, about 0 for noise; 1 for a constant image (neighbours are equal). Neighbours are
    always adjacent voxels, whatever the image's size (a sub-grid's "neighbours" several voxels
    apart would make a large image look rougher than a small one): every s-th slice along the first
    axis with the slice after it, s chosen so that about SAMPLE_VOXELS are read."""
    ch = np.asarray(channel)
    per_slice = max(int(np.prod(ch.shape[1:])), 1)
    step = max(1, int(np.ceil(ch.shape[0] * per_slice / SAMPLE_VOXELS)))
    first = np.arange(0, max(ch.shape[0] - 1, 1), step)
    sub = ch[first]
    pairs = [(ch[first], ch[first + 1])] if ch.shape[0] > 1 else []
    pairs += [(np.moveaxis(sub, a, 0)[:-1], np.moveaxis(sub, a, 0)[1:]) for a in range(1, ch.ndim) if ch.shape[a] > 1]
    corr = []
    for a, b in pairs:
        x, y = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
        sx, sy = x.std(), y.std()
        corr.append(1.0 if sx == 0 or sy == 0 else float(np.mean((x - x.mean()) * (y - y.mean())) / (sx * sy)))
    return float(np.mean(corr)) if corr else 1.0


def image_features(image: np.ndarray) -> dict[str, float]:
    """Per channel of a (c, z, y, x) image as the network sees it (cropped and normalised as the plan
    says, before resampling to the plan's spacing, which would smooth noise): the 1st, 50th and 99th
    percentile of its values and its ``smoothness``, as ``ch<c>_<stat>``. What tells a noise volume
    or another modality's image from the training cases. Normalised, because raw values are not
    comparable between images where the plan z-scores each image (MRI: one scanner's 0..500 is
    another's 0..400000); for CT the values are clipped HU, shifted and scaled by the dataset's
    statistics (every image alike)."""
    out = {}
    for c, channel in enumerate(image):
        p01, p50, p99 = np.percentile(_subsampled(np.asarray(channel)), [1, 50, 99])
        out |= {f"ch{c}_p01": float(p01), f"ch{c}_p50": float(p50), f"ch{c}_p99": float(p99),
                f"ch{c}_smoothness": smoothness(channel)}
    return out


def probability_features(probabilities: np.ndarray, lm: LabelModel) -> dict[str, float]:
    """What the network's (outputs, ...) probabilities say about their own prediction:

    - ``entropy``: the mean normalised entropy (0 sure .. 1 as unsure as can be) over the predicted
      structures and one voxel around them (where a prediction can be wrong; the background far from
      anything is sure and right and would drown the figure). Softmax: the entropy of the class
      distribution over log K; regions: the mean binary entropy of the sigmoids over log 2. 1.0
      where nothing is predicted: there is nothing the network is sure of.
    - ``self_dice``: the Dice the network expects of itself, per structure the soft Dice between its
      probability and its own predicted mask (2 sum(p m) / (sum p + sum m)), the mean over the
      structures; 1 for a structure neither predicted nor given any probability mass.
    """
    p32 = probabilities.astype(np.float32, copy=False)
    p = np.clip(p32, 1e-6, 1.0)
    if lm.has_regions:
        masks = p32 > 0.5
        fg = masks.any(axis=0)
        q = np.clip(1.0 - p32, 1e-6, 1.0)
        h = -(p * np.log(p) + q * np.log(q)).mean(axis=0) / np.log(2.0)
        channels = range(p32.shape[0])
    else:
        arg = np.argmax(p32, axis=0)
        fg = arg != 0
        h = -(p * np.log(p)).sum(axis=0) / np.log(max(p32.shape[0], 2))
        masks = None
        channels = range(1, p32.shape[0])
    dice = []
    for c in channels:
        m = masks[c] if masks is not None else arg == c
        total = float(p32[c].sum(dtype=np.float64)) + float(m.sum())
        dice.append(1.0 if total == 0 else 2.0 * float(p32[c][m].sum(dtype=np.float64)) / total)
    ent = 1.0 if not fg.any() else float(np.clip(h[ndimage.binary_dilation(fg, iterations=1)].mean(), 0.0, 1.0))
    return {"entropy": ent, "self_dice": float(np.mean(dice)) if dice else 1.0}


def volume_features(labels: np.ndarray, spacing, lm: LabelModel) -> dict[str, float]:
    """Predicted volume in ml of each structure of ``lm`` (each foreground label, or each region)
    in a label map of values, as ``ml_<structure>``."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    return {f"ml_{name}": float(mask_of(labels, values).sum()) * voxel_ml for name, values in lm.structures.items()}
