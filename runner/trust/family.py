"""The training family: what the plan's training images look like, and when a new input is unlike
them ("out of family": noise, another modality, another unit).

Each image feature of runner/trust/features.py gets Tukey's far-out fences over the training cases,
``[q25 - 3 s, q75 + 3 s]`` with ``s`` the inter-quartile range, but never less than a floor (5% of the
channel's typical 1..99 percentile span for the intensities, 0.05 for smoothness): features every
training case shares exactly (MRI cropped to a 0 background: every 1st percentile is 0) would
otherwise fence out any other value at all. Nothing is fitted to Dice: the fences need only the
training images, so they exist as soon as the dataset is preprocessed, before any fold is trained.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from segplan.planner.fileio import write_yaml
from segplan.runner.workspace import Workspace

FAR_OUT = 3.0              # Tukey's far-out fences
SMOOTHNESS_FLOOR = 0.05
INTENSITY_FLOOR = 0.05     # of the channel's median (p99 - p01)


def fences(rows: list[dict[str, float]]) -> dict[str, list[float]]:
    """Per image feature, [low, high] over the training cases' ``rows`` (feature -> value)."""
    if not rows:
        return {}
    keys = [k for k in rows[0] if all(k in r for r in rows)]
    out = {}
    for key in keys:
        v = np.array([r[key] for r in rows], np.float64)
        q25, q75 = np.percentile(v, [25, 75])
        if key.endswith("_smoothness"):
            floor = SMOOTHNESS_FLOOR
        else:
            ch = key.split("_")[0]
            span = np.median([r[f"{ch}_p99"] - r[f"{ch}_p01"] for r in rows])
            floor = INTENSITY_FLOOR * max(float(span), 1e-6)
        s = max(float(q75 - q25), floor)
        out[key] = [float(q25 - FAR_OUT * s), float(q75 + FAR_OUT * s)]
    return out


def outside(features: dict[str, float], limits: dict[str, list[float]]) -> list[str]:
    """The features of one case outside the family's fences, in words ("ch0_smoothness 0.01 outside
    the training cases' 0.62..1.08"); none for a case of the family."""
    out = []
    for key, (lo, hi) in limits.items():
        v = features.get(key)
        if v is None or math.isnan(v):
            continue
        if not lo <= v <= hi:
            out.append(f"{key} {v:.4g} outside the training cases' {lo:.4g}..{hi:.4g}")
    return out


def family_rows(ws: Workspace) -> tuple[dict[str, dict[str, float]], str]:
    """Case id -> image features of the plan's training cases, as preprocessing recorded them in its
    cache, and what is missing (empty: nothing): cases preprocessed before segplan recorded them, or
    no cache at all."""
    folder = ws.preprocessed
    rows, older = {}, 0
    for props in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        data = json.loads(props.read_text())
        if "case_id" not in data:   # plan_fields.json
            continue
        if data.get("image_features"):
            rows[data["case_id"]] = data["image_features"]
        else:
            older += 1
    if not rows:
        return rows, (f"no training case in {folder} records its image features (not preprocessed, preprocessed "
                      "before segplan recorded them, or deleted): run `segplan preprocess` (after deleting that "
                      "folder, if it exists) to check new inputs against the training cases")
    return rows, (f"{older} of {older + len(rows)} training cases were preprocessed before segplan recorded image "
                  "features; the fences use the others" if older else "")


def save_fences(limits: dict[str, list[float]], n_cases: int, path: Path) -> None:
    write_yaml(path, {"n_training_cases": n_cases, "far_out": FAR_OUT, "fences": limits},
               header="segplan training family: per image feature, the range a new input must stay in "
                      "(Tukey's far-out fences over the training cases)")
