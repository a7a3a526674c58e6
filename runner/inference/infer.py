"""Sliding-window inference in numpy; the predictor is any function, so tiling knows nothing of Keras.

Tiling works on any number of spatial axes. A 2d plan tiles its 3D volume with windows one slice
deep (segplan.planner.plan.volume_patch) and ``on_windows`` hands its 2D network each window as a slice:
the slices are predicted in batches of ``inference.batch_size`` and land on the 3D grid as 3D
windows would.

Memory is O(volume x classes): one float32 accumulator for the weighted sum and one for the
weights; windows are cut, predicted and added in batches, never all held at once.
"""
from __future__ import annotations

import itertools
from typing import Callable

import numpy as np

from segplan.planner.heuristics import window_starts


def gaussian_weights(patch: list[int], sigma_scale: float = 1.0 / 8) -> np.ndarray:
    """Importance map: a Gaussian centred on the patch (sigma = patch / 8, per axis, any number of
    axes; 1 along an axis one voxel long), never zero."""
    grids = [np.exp(-0.5 * ((np.arange(p) - (p - 1) / 2) / max(p * sigma_scale, 1e-6)) ** 2) for p in patch]
    w = np.ones((), np.float64)
    for g in grids:
        w = np.multiply.outer(w, g)
    w = w / w.max()
    return np.maximum(w, 1e-3).astype(np.float32)


def sliding_window(volume: np.ndarray, patch: list[int], predict: Callable[[np.ndarray], np.ndarray],
                   n_out: int, overlap: float = 0.5, weighting: str = "constant", batch_size: int = 1,
                   progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Predict a (c, z, y, x) volume window by window (any number of spatial axes, one per entry
    of ``patch``).

    ``predict`` maps a (b, c, *patch) batch to (b, n_out, *patch). Volumes smaller than the patch are
    padded (edge values) and cropped back. Overlapping outputs are averaged with constant or Gaussian
    weights. Returns (n_out, z, y, x) float32.
    """
    shape = volume.shape[1:]
    pad = [max(p - s, 0) for s, p in zip(shape, patch)]
    if any(pad):
        widths = [(0, 0)] + [(d // 2, d - d // 2) for d in pad]
        volume = np.pad(volume, widths, mode="edge")
    padded = volume.shape[1:]
    acc = np.zeros((n_out, *padded), np.float32)
    norm = np.zeros(padded, np.float32)
    weight = gaussian_weights(patch) if weighting == "gaussian" else np.ones(patch, np.float32)
    starts = list(itertools.product(*[window_starts(s, p, overlap) for s, p in zip(padded, patch)]))
    for i in range(0, len(starts), batch_size):
        chunk = starts[i:i + batch_size]
        batch = np.stack([volume[(slice(None), *[slice(s, s + p) for s, p in zip(st, patch)])] for st in chunk])
        out = np.asarray(predict(batch), dtype=np.float32)
        for st, o in zip(chunk, out):
            sl = tuple(slice(s, s + p) for s, p in zip(st, patch))
            acc[(slice(None), *sl)] += o * weight
            norm[sl] += weight
        if progress:
            progress(min(i + batch_size, len(starts)), len(starts))
    acc /= norm
    if any(pad):
        sl = tuple(slice(d // 2, d // 2 + s) for d, s in zip(pad, shape))
        acc = np.ascontiguousarray(acc[(slice(None), *sl)])
    return acc


def on_windows(predict: Callable[[np.ndarray], np.ndarray], patch: list[int], window: list[int]
               ) -> Callable[[np.ndarray], np.ndarray]:
    """A predictor of (b, c, *window) batches from a network's of (b, c, *patch): each window
    reshaped to the patch and the output back. The same voxels either way: a 2d plan's window is
    its patch with a one-voxel slice axis (segplan.planner.plan.volume_patch); a 3d plan's is the patch."""
    def predict_windows(batch: np.ndarray) -> np.ndarray:
        out = np.asarray(predict(batch.reshape(batch.shape[:2] + tuple(patch))))
        return out.reshape(out.shape[:2] + tuple(window))
    return predict_windows


def mirrored(predict: Callable[[np.ndarray], np.ndarray], axes: list[int]) -> Callable[[np.ndarray], np.ndarray]:
    """Test-time augmentation: average ``predict`` over every combination of flips of ``axes``
    (spatial axes of the patch, 0 = z), each flip undone on the output."""
    combos = [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]

    def tta(batch: np.ndarray) -> np.ndarray:
        total = None
        for combo in combos:
            ax = tuple(a + 2 for a in combo)
            x = np.flip(batch, ax) if ax else batch
            y = np.asarray(predict(np.ascontiguousarray(x)), dtype=np.float32)
            y = np.flip(y, ax) if ax else y
            total = y if total is None else total + y
        return total / len(combos)
    return tta


def keras_predictor(models: list) -> Callable[[np.ndarray], np.ndarray]:
    """(b, c, z, y, x) -> (b, k, z, y, x), averaging the softmax of several Keras models (folds);
    the only place where channels-last is introduced at prediction time."""
    def predict(batch: np.ndarray) -> np.ndarray:
        x = np.moveaxis(batch, 1, -1).astype(np.float32)
        out = sum(np.asarray(m.predict_on_batch(x), dtype=np.float32) for m in models) / len(models)
        return np.moveaxis(out, -1, 1)
    return predict
