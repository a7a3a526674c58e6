"""A quality score for every predicted case, chosen by measurement on the plan's folds.

Each candidate is a least-squares line (or plane) from features of runner/trust/features.py to the
case's Dice (the mean over its structures), so every score reads as an expected Dice, higher is
more trustworthy:

- ``entropy``: the network's mean entropy over the predicted structures;
- ``self_dice``: the Dice the network expects of itself (the soft Dice of its probabilities with
  its own prediction);
- ``volume``: how far the predicted volumes lie from those the folds predicted (the largest robust
  z-score of a structure's log volume);
- ``self_dice+volume``, ``entropy+volume``: two of them.

Everything is cross-fitted: for each fold the lines, the volume reference and the flag threshold
come from the other folds, so the Spearman correlations and the flag figures are on cases the fit
did not see. The candidate with the best Spearman correlation is kept and refitted on every fold
for new predictions. The flag: an expected Dice below the threshold that best separates (Youden's
J) the worst WORST_SHARE of the cases by Dice from the others, flagging at most FLAG_AT_MOST of them.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats

from segplan.runner.trust.family import fences, outside

CANDIDATES = {"entropy": ("entropy",), "self_dice": ("self_dice",), "volume": ("volume",),
              "entropy+volume": ("entropy", "volume"), "self_dice+volume": ("self_dice", "volume")}
FEATURES = ("entropy", "self_dice")   # what a row must hold besides the volumes
WORST_SHARE = 0.10
FLAG_AT_MOST = 0.20        # of the cases: a reader checks at most one case in five
RIDGE = 1e-3
VOLUME_FLOOR_ML = 0.01     # added before the log: an empty structure is far from any volume, not -inf
SCALE_FLOOR = 0.05         # of a log volume's robust spread


def volume_reference(rows: list[dict]) -> dict[str, list[float]]:
    """Per predicted-volume feature (``ml_*``), the median and robust spread (1.4826 MAD, at least
    SCALE_FLOOR) of its log over ``rows``."""
    keys = [k for k in rows[0] if k.startswith("ml_")] if rows else []
    ref = {}
    for k in keys:
        v = np.log(np.array([r[k] for r in rows], np.float64) + VOLUME_FLOOR_ML)
        med = float(np.median(v))
        ref[k] = [med, max(1.4826 * float(np.median(np.abs(v - med))), SCALE_FLOOR)]
    return ref


def volume_deviation(row: dict, ref: dict[str, list[float]]) -> float:
    """The largest robust z-score of a structure's log predicted volume against ``ref``."""
    z = [abs(math.log(row[k] + VOLUME_FLOOR_ML) - m) / s for k, (m, s) in ref.items() if k in row]
    return max(z) if z else 0.0


def _design(rows: list[dict], names: tuple, ref: dict) -> np.ndarray:
    cols = [[volume_deviation(r, ref) for r in rows] if n == "volume" else [r[n] for r in rows] for n in names]
    return np.column_stack([np.ones(len(rows))] + [np.asarray(c, np.float64) for c in cols])


def fit_line(rows: list[dict], dice: np.ndarray, names: tuple) -> dict:
    """The candidate ``names`` fitted on ``rows`` and their Dice: coefficients and volume reference."""
    ref = volume_reference(rows)
    x = _design(rows, names, ref)
    reg = RIDGE * np.eye(x.shape[1])
    reg[0, 0] = 0.0
    coef = np.linalg.solve(x.T @ x + reg, x.T @ dice)
    return {"features": list(names), "coefficients": [float(c) for c in coef], "volume_reference": ref}


def expected_dice(model: dict, rows: list[dict]) -> np.ndarray:
    """A fitted candidate's score (expected Dice, clipped to 0..1) of each row."""
    x = _design(rows, tuple(model["features"]), model["volume_reference"])
    return np.clip(x @ np.asarray(model["coefficients"]), 0.0, 1.0)


def worst(dice: np.ndarray) -> np.ndarray:
    """The worst WORST_SHARE of the cases by Dice (at least one)."""
    n = max(1, int(round(WORST_SHARE * len(dice))))
    return np.isin(np.arange(len(dice)), np.argsort(dice, kind="stable")[:n])


def youden_threshold(score: np.ndarray, bad: np.ndarray) -> float:
    """The threshold t (flag score < t) that maximises caught bad share minus flagged good share
    (Youden's J) among those that flag at most FLAG_AT_MOST of the cases: with a weak score the
    best J can lie at flagging most cases, and a flag on most cases points nowhere."""
    best, best_j = float(np.min(score)), -np.inf
    for t in np.unique(score):
        t = float(np.nextafter(t, np.inf))   # flag this score and every lower one
        flagged = score < t
        if flagged.mean() > FLAG_AT_MOST:
            break                            # thresholds only rise from here
        j = flagged[bad].mean() - (flagged[~bad].mean() if (~bad).any() else 0.0)
        if j > best_j:
            best, best_j = t, j
    return best


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(stats.spearmanr(a, b).statistic)


def cross_fit(rows: list[dict], dice: np.ndarray, fold: np.ndarray) -> dict:
    """Every candidate cross-fitted by fold; the best by Spearman refitted on all rows, with its
    threshold and the figures of its cross-fitted flags (see the module). ``rows``: per case its
    features; ``dice``, ``fold``: per case."""
    folds = sorted(set(fold.tolist()))
    scores, by_candidate = {}, {}
    for name, names in CANDIDATES.items():
        s = np.zeros(len(rows))
        for k in folds:
            train, test = fold != k, fold == k
            model = fit_line([r for r, t in zip(rows, train) if t], dice[train], names)
            s[test] = expected_dice(model, [r for r, t in zip(rows, test) if t])
        scores[name] = s
        by_candidate[name] = spearman(s, dice)
    valid = {n: v for n, v in by_candidate.items() if not math.isnan(v)}
    chosen = max(valid, key=valid.get) if valid else "entropy"
    score = scores[chosen]
    flagged = np.zeros(len(rows), bool)
    for k in folds:   # the threshold, too, from the other folds' (cross-fitted) scores
        train, test = fold != k, fold == k
        t = youden_threshold(score[train], worst(dice[train]))
        flagged[test] = score[test] < t
    bad = worst(dice)
    model = fit_line(rows, dice, CANDIDATES[chosen])
    model["threshold"] = youden_threshold(score, bad)
    return {"model": model, "chosen": chosen, "spearman": by_candidate, "score": score, "flagged": flagged,
            "worst": bad}


def family_cross_check(image_rows: list[dict], fold: np.ndarray) -> np.ndarray:
    """Per case whether it falls outside the fences of the other folds' cases: how often an
    ordinary case of the training family would be called out of family."""
    out = np.zeros(len(image_rows), bool)
    for k in sorted(set(fold.tolist())):
        limits = fences([r for r, f in zip(image_rows, fold) if f != k])
        for i in np.flatnonzero(fold == k):
            out[i] = bool(outside(image_rows[i], limits))
    return out
