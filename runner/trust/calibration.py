"""Calibrated probabilities: temperature scaling (Guo et al. 2017) fitted on a plan's out-of-fold
probabilities, and the expected calibration error (ECE) that says whether it helped.

A softmax plan's probabilities become ``softmax(log p / T)`` with one T (per side, below): one T
keeps every arg-max, so the calibrated probabilities' arg-max is the label map; a T per class
would move arg-maxes. A region plan's sigmoids become ``sigmoid(logit p / T)`` with one T for the
plan or one per region, whichever measures better: neither moves a sigmoid across 0.5. Label maps
are made from the uncalibrated probabilities all the same, so calibration never changes a label
(an ensemble averages calibrated members, whose average may rank classes differently).

Two temperatures: one ``near`` the predicted structures (within BAND_VOXELS of a voxel the network
labels foreground: where its mistakes lie), one ``far`` from them (the rest of the image, where it
is sure and mostly right, and where a missed structure hides). One temperature for the whole image
fits either the boundary (and then softens the background everywhere: on Hippocampus the ECE over
all voxels went from 0.004 to 0.027) or the background (and leaves the boundary over-confident).
Which side a voxel is on is known at prediction (the label map is made first), so both apply.

Which voxels are scored: ``ece_before/after`` over the annotated voxels (the ignore label left out)
within BAND_VOXELS of a predicted or a reference structure. Far from every structure the network is
sure and right; those voxels are >95% of an image and would put every plan's ECE near 0 whatever it
does. The ECE over all annotated voxels is written too.

Saturation: out-of-fold probabilities are stored as float16, which keeps nothing between 1 - 2^-12
and 1, so stored 0s and 1s only say "within 2^-12 of it": values are clipped to
[EPS, 1 - EPS] (EPS = 2^-12) before the log when fitting. A new prediction's float32
probabilities are clipped only against log(0) (PREDICT_EPS).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage, optimize

from segplan.planner.labels import LabelModel

BINS = 15
BAND_VOXELS = 2
EPS = 2.0 ** -12
PREDICT_EPS = 1e-7       # float32 probabilities at prediction: clipped only against log(0)
LOG_T_BOUNDS = (np.log(0.05), np.log(20.0))
BAND_SAMPLES = 20_000     # per case, at most (a random subset of a larger band)
ALL_SAMPLES = 5_000       # per case, uniform over annotated voxels, weighted back to all of them


@dataclass
class Samples:
    """Voxels of one or more cases: probabilities (n, outputs), the truth (n,) class indices for a
    softmax plan or (n, outputs) 0/1 region membership, a weight per voxel, and whether it lies near
    the predicted structures (``near_mask``)."""

    probs: np.ndarray
    truth: np.ndarray
    weight: np.ndarray
    near: np.ndarray

    @staticmethod
    def join(parts: list["Samples"]) -> "Samples":
        return Samples(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("probs", "truth", "weight", "near")))

    def subset(self, keep: np.ndarray) -> "Samples":
        return Samples(self.probs[keep], self.truth[keep], self.weight[keep], self.near[keep])


@dataclass
class CaseSamples:
    band: Samples
    everywhere: Samples


def near_mask(labels: np.ndarray) -> np.ndarray:
    """The voxels within BAND_VOXELS of a predicted structure (any non-zero label) of a label map."""
    fg = labels != 0
    return ndimage.binary_dilation(fg, iterations=BAND_VOXELS) if fg.any() else fg


def case_samples(probs: np.ndarray, classes: np.ndarray, lm: LabelModel, rng: np.random.Generator) -> CaseSamples:
    """A case's calibration voxels from its (outputs, z, y, x) out-of-fold probabilities and
    reference as class indices on the same grid (preprocess.labels_to_classes: the ignore label is
    index K, a value the plan does not know is background, as evaluation scores it): the band (see
    the module) and a uniform sample of all annotated voxels, weighted back to their number; each
    voxel marked near or far. The truth is the network's target: the class index, or for a region
    plan each region's membership (labels.region_table)."""
    annotated = classes != lm.ignore_index if lm.has_ignore else np.ones(classes.shape, bool)
    truth = np.moveaxis(lm.region_table()[classes], -1, 0).astype(np.uint8) if lm.has_regions else classes
    predicted = lm.to_label_map(probs)
    near = near_mask(predicted)
    fg = (predicted != 0) | (truth.any(axis=0) if lm.has_regions else (classes > 0) & annotated)
    band = ndimage.binary_dilation(fg, iterations=BAND_VOXELS) & annotated if fg.any() else np.zeros_like(fg)

    def take(mask: np.ndarray, cap: int, weighted: bool) -> Samples:
        idx = np.flatnonzero(mask)
        n = idx.size
        if n > cap:
            idx = np.sort(rng.choice(idx, cap, replace=False))
        p = probs.reshape(probs.shape[0], -1)[:, idx].T.astype(np.float32)
        t = truth.reshape(truth.shape[0], -1)[:, idx].T if lm.has_regions else truth.ravel()[idx]
        w = np.full(idx.size, (n / idx.size) if weighted and idx.size else 1.0, np.float64)
        return Samples(p, t, w, near.ravel()[idx])
    return CaseSamples(take(band, BAND_SAMPLES, False), take(annotated, ALL_SAMPLES, True))


def apply(probs: np.ndarray, temperature, lm: LabelModel, axis: int = 0, dtype=np.float32,
          eps: float = EPS) -> np.ndarray:
    """Calibrated probabilities of ``probs`` (outputs along ``axis``) with ``temperature``: a number,
    or one per output. ``dtype``: float32 for images; the fit computes in float64 (its numerical
    gradient's steps of 1e-8 vanish in float32). ``eps``: the clip before the log, EPS for the
    stored float16 probabilities the fit reads, PREDICT_EPS for a new prediction's float32 ones (a
    2^-12 floor there would, with a temperature above 1, lend every sure background voxel a visible
    share of each foreground class)."""
    t = np.asarray(temperature, dtype)
    if t.ndim:
        shape = [1] * probs.ndim
        shape[axis] = t.size
        t = t.reshape(shape)
    p = np.clip(probs.astype(dtype), eps, 1.0 - eps)
    if lm.has_regions:
        return (1.0 / (1.0 + np.exp(-(np.log(p) - np.log1p(-p)) / t))).astype(dtype, copy=False)
    z = np.log(p) / t
    z -= z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=axis, keepdims=True)).astype(dtype, copy=False)


def _confidence(probs: np.ndarray, truth: np.ndarray, lm: LabelModel) -> tuple[np.ndarray, np.ndarray]:
    """Per scored prediction its confidence and whether it is right: the arg-max class of a softmax,
    or each region's thresholded sigmoid."""
    if lm.has_regions:
        return np.maximum(probs, 1.0 - probs).ravel(), ((probs > 0.5) == (truth > 0)).ravel()
    return probs.max(axis=1), probs.argmax(axis=1) == truth


def reliability(probs: np.ndarray, s: Samples, lm: LabelModel) -> dict:
    """Per equal-width confidence bin: weight, mean confidence, accuracy; and the ECE (the
    weighted mean gap between confidence and accuracy)."""
    conf, right = _confidence(probs, s.truth, lm)
    w = np.repeat(s.weight, probs.shape[1]) if lm.has_regions else s.weight
    b = np.minimum((conf * BINS).astype(int), BINS - 1)
    total = np.bincount(b, w, BINS)
    mean_conf = np.bincount(b, w * conf, BINS) / np.maximum(total, 1e-12)
    acc = np.bincount(b, w * right, BINS) / np.maximum(total, 1e-12)
    ece = float(np.sum(total * np.abs(acc - mean_conf)) / max(total.sum(), 1e-12))
    return {"ece": ece, "weight": total, "confidence": mean_conf, "accuracy": acc}


def _nll(log_t: np.ndarray, s: Samples, lm: LabelModel) -> float:
    q = np.clip(apply(s.probs, np.exp(log_t), lm, axis=1, dtype=np.float64), 1e-12, 1.0)
    if lm.has_regions:
        ll = s.truth * np.log(q) + (1 - s.truth) * np.log1p(-np.minimum(q, 1 - 1e-12))
        return float(-np.sum(s.weight[:, None] * ll) / s.weight.sum())
    return float(-np.sum(s.weight * np.log(q[np.arange(len(q)), s.truth])) / s.weight.sum())


def fit_temperature(s: Samples, lm: LabelModel, per_output: bool) -> np.ndarray:
    """The temperature(s) minimising the negative log-likelihood of ``s`` (one, or one per output)."""
    n = lm.n_outputs if per_output else 1
    res = optimize.minimize(lambda x: _nll(x, s, lm), np.zeros(n), method="L-BFGS-B", bounds=[LOG_T_BOUNDS] * n)
    return np.exp(res.x)


SCOPES = {"plan": False, "per_output": True}
SIDES = ("near", "far")


def scopes(lm: LabelModel) -> dict[str, bool]:
    """The scopes a plan's calibration may take: a region plan's sigmoids one temperature for the
    plan or one per region (neither moves a sigmoid across 0.5); a softmax plan's one per side only,
    since a temperature per class would move arg-maxes, and the calibrated probabilities' arg-max
    would no longer be the label map."""
    return SCOPES if lm.has_regions else {"plan": False}


def fit_sides(band: Samples, everywhere: Samples, lm: LabelModel, per_output: bool) -> dict[str, list[float]]:
    """The near temperature(s) fitted on the band's near voxels, the far one(s) on the weighted
    sample of all voxels that lie far (1 where a side has no voxel)."""
    out = {}
    for side, s in (("near", band.subset(band.near)), ("far", everywhere.subset(~everywhere.near))):
        n = lm.n_outputs if per_output else 1
        out[side] = [float(t) for t in fit_temperature(s, lm, per_output)] if len(s.weight) else [1.0] * n
    return out


def apply_sides(s: Samples, temperature: dict[str, list[float]], lm: LabelModel) -> np.ndarray:
    """Calibrated (n, outputs) probabilities of samples, each with its side's temperature."""
    out = np.empty(s.probs.shape, np.float32)
    for side, keep in (("near", s.near), ("far", ~s.near)):
        if keep.any():
            out[keep] = apply(s.probs[keep], temperature[side], lm, axis=1)
    return out


@dataclass
class CrossFit:
    """Cross-fitted figures of each scope, the chosen scope and its temperatures (near, far) fitted on
    every fold."""

    scope: str
    temperature: dict[str, list[float]]
    ece_before: float
    ece_after: float
    ece_all_before: float
    ece_all_after: float
    by_scope: dict = field(default_factory=dict)
    per_fold: list = field(default_factory=list)
    curves: dict = field(default_factory=dict)   # before/after reliability on the band, for the diagram


def cross_fit(folds: dict[int, list[CaseSamples]], lm: LabelModel) -> CrossFit:
    """Fit on the other folds, measure on each held-out fold, pooled over all folds; choose the scope
    with the lower held-out ECE near the structures; refit it on every fold for new predictions."""
    held_band = {k: Samples.join([c.band for c in cases]) for k, cases in folds.items()}
    held_all = {k: Samples.join([c.everywhere for c in cases]) for k, cases in folds.items()}
    band = Samples.join(list(held_band.values()))
    every = Samples.join(list(held_all.values()))
    before, before_all = reliability(band.probs, band, lm), reliability(every.probs, every, lm)
    by_scope, curves, per_fold = {}, {}, {}
    for scope, per_output in scopes(lm).items():
        cal_band, cal_all = [], []
        for k in folds:
            others = [j for j in folds if j != k]
            t = fit_sides(Samples.join([held_band[j] for j in others]), Samples.join([held_all[j] for j in others]),
                          lm, per_output)
            cal_band.append(apply_sides(held_band[k], t, lm))
            cal_all.append(apply_sides(held_all[k], t, lm))
            per_fold.setdefault(scope, []).append({"fold": k, "temperature": {s: [round(x, 4) for x in v]
                                                                              for s, v in t.items()},
                                                   "ece_before": reliability(held_band[k].probs, held_band[k], lm)["ece"],
                                                   "ece_after": reliability(cal_band[-1], held_band[k], lm)["ece"]})
        after = reliability(np.concatenate(cal_band), band, lm)
        after_all = reliability(np.concatenate(cal_all), every, lm)
        by_scope[scope] = {"ece_after": after["ece"], "ece_all_after": after_all["ece"]}
        curves[scope] = after
    scope = min(by_scope, key=lambda s: by_scope[s]["ece_after"])
    t = fit_sides(band, every, lm, SCOPES[scope])
    return CrossFit(scope, t, before["ece"], by_scope[scope]["ece_after"], before_all["ece"],
                    by_scope[scope]["ece_all_after"], by_scope, per_fold[scope],
                    {"before": before, "after": curves[scope]})
