"""What `segplan predict` says about each case it segments: ``OUT/qc.csv`` (case, score, flagged,
reason) and the features the score came from (``OUT/qc_features.csv``); calibrated probabilities
where the plan has a calibration.

``Trust`` is what a plan's work folder (or a bundle) knows for this: the calibration and the quality
model `segplan summarize` fitted on the folds (WORK/calibration.yaml, WORK/qc.yaml) and the training
family's fences (from the preprocessed training cases). Any of them may be missing (predict before
summarize): ``missing`` says which, and every row's reason says so.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from scipy import ndimage

from segplan.planner.fileio import write_yaml
from segplan.planner.labels import LabelModel
from segplan.runner.evaluation.tables import read_rows, write_rows
from segplan.runner.trust import calibration as cal
from segplan.runner.trust.family import family_rows, fences, outside, save_fences
from segplan.runner.trust.quality import expected_dice
from segplan.runner.workspace import (CALIBRATION as CALIBRATION_FILE, QC_FAMILY as FAMILY_FILE, QC_FEATURES,
                                      QC_MODEL as QC_FILE)

QC_COLUMNS = ("case", "score", "flagged", "reason")
SLAB_VOXELS = 8_000_000   # calibrated this many values (all outputs) at a time


@dataclass(frozen=True)
class Trust:
    """A plan's calibration (temperatures), quality model and training-family fences, each None
    where there is none yet, and why not."""

    temperature: dict[str, list[float]] | None = None   # near / far (runner/trust/calibration.py)
    quality: dict | None = None
    fences: dict | None = None
    missing: list[str] = field(default_factory=list)

    def calibrate(self, probs: np.ndarray, labels: np.ndarray, lm: LabelModel, in_place: bool = False) -> np.ndarray:
        """Calibrated (outputs, z, ...) probabilities, or ``probs`` where there is no calibration:
        the near temperature within reach of the structures ``labels`` (the label map made from
        ``probs``) predicts, the far one elsewhere. A slab of slices at a time (a 512 x 512 x 300
        CT's 4 classes are 1.3 GB in float32; the whole at once would hold several such
        temporaries), into ``probs`` itself where ``in_place`` and it is float32."""
        if self.temperature is None:
            return probs
        near = cal.near_mask(labels)
        box = ndimage.find_objects(near.astype(np.uint8))   # the near side's bounding box: its temperature there only
        box = box[0] if box else None
        out = probs if in_place and probs.dtype == np.float32 else np.empty(probs.shape, np.float32)
        step = max(1, SLAB_VOXELS // max(1, int(np.prod(probs.shape)) // max(probs.shape[1], 1)))
        t = self.temperature
        for z in range(0, probs.shape[1], step):
            zs = slice(z, min(z + step, probs.shape[1]))
            inner = None
            if box is not None and zs.start < box[0].stop and box[0].start < zs.stop:
                inner = (slice(max(zs.start, box[0].start), min(zs.stop, box[0].stop)),) + box[1:]
                near_part = cal.apply(probs[(slice(None),) + inner], t["near"], lm, eps=cal.PREDICT_EPS)
            out[:, zs] = cal.apply(probs[:, zs], t["far"], lm, eps=cal.PREDICT_EPS)
            if inner is not None:
                region = out[(slice(None),) + inner]
                np.copyto(region, near_part, where=near[inner])
        return out


def _read_yaml(path: Path) -> dict | None:
    return yaml.safe_load(path.read_text()) if path.exists() else None


def load_trust(folder: Path, fences_of=None) -> Trust:
    """What ``folder`` (a work folder, or an unpacked bundle's model folder) holds; ``fences_of``:
    () -> (fences, why missing) where the fences are not stored as a file (a work folder computes
    them from its preprocessed cases)."""
    missing = []
    c = _read_yaml(folder / CALIBRATION_FILE)
    q = _read_yaml(folder / QC_FILE)
    if q is None:
        missing.append("no QC model yet (`segplan summarize` fits it once two or more folds are validated): the "
                       "score is 1 - the mean entropy, not fitted to Dice, and only out-of-family inputs are flagged")
    stored = _read_yaml(folder / FAMILY_FILE)
    limits, why = (stored["fences"], "") if stored else (fences_of() if fences_of else ({}, "no training family"))
    if why:
        missing.append(why if limits else f"out of family not checked: {why}")
    return Trust(c["temperature"] if c else None, q["model"] if q else None, limits or None, missing)


def workspace_trust(ws) -> Trust:
    """A plan's Trust from its work folder (fences from its preprocessed training cases)."""
    def from_cases():
        rows, why = family_rows(ws)
        return fences(list(rows.values())), why
    return load_trust(ws.root, from_cases)


def save_family(ws, path: Path) -> bool:
    """Write the work folder's training-family fences to ``path`` (for a bundle); False if there are none."""
    rows, _ = family_rows(ws)
    if not rows:
        return False
    save_fences(fences(list(rows.values())), len(rows), path)
    return True


def check_case(case_id: str, features: dict, trust: Trust) -> dict:
    """A case's qc.csv row: its score (an expected Dice where there is a quality model, else
    1 - mean entropy; 0 out of family), whether it is flagged, and why (out of family, low expected
    quality, and what was not checked)."""
    reasons = []
    if trust.fences:
        far = outside(features, trust.fences)
        if far:
            reasons.append("out of family: " + "; ".join(far))
    if trust.quality is not None:
        score = float(expected_dice(trust.quality, [features])[0])
        if score < trust.quality["threshold"] and not reasons:   # out of family already says more
            reasons.append(f"low expected quality: expected Dice {score:.3f} below {trust.quality['threshold']:.3f} "
                           "(the flag threshold chosen on the folds)")
    else:
        score = 1.0 - float(features["entropy"])
    if reasons and reasons[0].startswith("out of family"):
        # the score is fitted on (or read from) the training family: outside it nothing is to be expected
        score = 0.0
        reasons[0] += " (score 0: an expected Dice holds only for inputs like the training cases)"
    flagged = bool(reasons)
    notes = list(trust.missing)
    return {"case": case_id, "score": round(score, 4), "flagged": "true" if flagged else "false",
            "reason": " | ".join(reasons + notes)}


def _merged(path: Path, rows: list[dict]) -> list[dict]:
    """``rows`` after the rows of other cases already in ``path`` (an earlier run into the same folder)."""
    ours = {r["case"] for r in rows}
    return [r for r in read_rows(path) if r.get("case") not in ours] + rows


def write_features(out_dir: Path, feature_rows: list[dict]) -> None:
    """OUT/qc_features.csv: per case what its check is computed from (other cases' rows kept)."""
    path = out_dir / QC_FEATURES
    write_rows(_merged(path, feature_rows), path)


def write_qc(out_dir: Path, rows: list[dict], feature_rows: list[dict]) -> None:
    """OUT/qc.csv and OUT/qc_features.csv, rewritten after each case (nothing lost on a crash)."""
    path = out_dir / "qc.csv"
    write_rows([{k: r.get(k, "") for k in QC_COLUMNS} for r in _merged(path, rows)], path, list(QC_COLUMNS))
    write_features(out_dir, feature_rows)


def say_flagged(rows: list[dict], out_dir: Path) -> None:
    """One line on stderr: how many cases were flagged, and where to read why."""
    n = sum(r["flagged"] == "true" for r in rows)
    print(f"segplan: quality check: {n} of {len(rows)} case(s) flagged (reasons in {out_dir / 'qc.csv'})",
          file=sys.stderr, flush=True)


def save_calibration(path: Path, fit, lm: LabelModel, cases: int, folds: list[int]) -> None:
    """WORK/calibration.yaml from a calibration.CrossFit."""
    def r(x):
        return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), 5)
    write_yaml(path, {
        "method": "temperature scaling (Guo et al. 2017), fitted by negative log-likelihood",
        "scope": fit.scope, "outputs": lm.outputs,
        "temperature": {side: [round(t, 5) for t in ts] for side, ts in fit.temperature.items()},
        "sides": (f"near: voxels within {cal.BAND_VOXELS} voxels of a predicted structure; far: all others (one "
                  "temperature for both would soften the sure background while fitting the boundary)"),
        "ece_before": r(fit.ece_before), "ece_after": r(fit.ece_after),
        "ece_all_voxels_before": r(fit.ece_all_before), "ece_all_voxels_after": r(fit.ece_all_after),
        "bins": cal.BINS,
        "voxels": (f"ece_before/after: annotated voxels within {cal.BAND_VOXELS} voxels of a predicted or reference "
                   "structure (far from every structure the network is sure and right; those voxels would put any "
                   "ECE near 0); ece_all_voxels_*: every annotated voxel"),
        "cross_fitted": (f"each of folds {folds} calibrated with temperatures fitted on the other folds' out-of-fold "
                         f"probabilities and measured on its own ({cases} cases); the temperatures above are fitted on "
                         "all of them, for new predictions"),
        "saturation": (f"float16 out-of-fold probabilities clipped to [{cal.EPS:.3g}, 1 - {cal.EPS:.3g}] before the "
                       "log: float16 keeps nothing between 1 - 2^-12 and 1"),
        "scopes_cross_fitted": {k: {m: r(v) for m, v in d.items()} for k, d in fit.by_scope.items()},
        "per_fold": [{k: (r(v) if k.startswith("ece") else v) for k, v in row.items()} for row in fit.per_fold],
        "labels": "label maps are made from the uncalibrated probabilities: calibration never changes a label",
    }, header="segplan calibration: what `segplan predict --save-probabilities` applies")
