"""Per case and class: Dice, sensitivity, specificity (the paper's formulas from the confusion
matrix), IoU, volumes in ml; optional 95% Hausdorff distance and normalised surface Dice. Label groups (lungs = left + right)
are evaluated as their union. Results as CSV per case and a YAML summary."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from planner.dataset import ENDINGS, atomic_write_text, read_label
from planner.schema import to_plain
from runner.tables import write_rows

METRICS = ("dice", "sensitivity", "specificity", "iou", "pred_ml", "ref_ml")


def confusion(pred: np.ndarray, ref: np.ndarray) -> tuple[int, int, int, int]:
    """(TP, FP, FN, TN) of two boolean masks."""
    tp = int(np.count_nonzero(pred & ref))
    fp = int(np.count_nonzero(pred & ~ref))
    fn = int(np.count_nonzero(~pred & ref))
    return tp, fp, fn, int(pred.size) - tp - fp - fn


def mask_metrics(pred: np.ndarray, ref: np.ndarray, voxel_ml: float, spacing=None, hd95: bool = False,
                 nsd_tolerance: float | None = None) -> dict:
    """Dice = 2TP/(2TP+FP+FN), sensitivity = TP/(TP+FN), specificity = TN/(TN+FP), IoU = TP/(TP+FP+FN).
    Empty reference and empty prediction: Dice, IoU, sensitivity 1.0 and ``empty_reference`` set."""
    tp, fp, fn, tn = confusion(pred, ref)
    empty = tp + fn == 0
    out = {"dice": 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 1.0,
           "sensitivity": tp / (tp + fn) if (tp + fn) else (1.0 if fp == 0 else 0.0),
           "specificity": tn / (tn + fp) if (tn + fp) else 1.0,
           "iou": tp / (tp + fp + fn) if (tp + fp + fn) else 1.0,
           "pred_ml": (tp + fp) * voxel_ml, "ref_ml": (tp + fn) * voxel_ml, "empty_reference": bool(empty)}
    if hd95 or nsd_tolerance is not None:
        d_p, d_r = surface_distances(pred, ref, spacing)
        if hd95:
            out["hd95_mm"] = float(np.percentile(np.concatenate([d_p, d_r]), 95)) if d_p is not None else float("nan")
        if nsd_tolerance is not None:
            out["surface_dice"] = (float((np.sum(d_p <= nsd_tolerance) + np.sum(d_r <= nsd_tolerance)) / (d_p.size + d_r.size))
                                   if d_p is not None else float(not pred.any() and not ref.any()))
    return out


def surface_distances(pred: np.ndarray, ref: np.ndarray, spacing):
    """Distances (mm) from each surface voxel of ``pred`` to the surface of ``ref`` and back;
    (None, None) if either mask is empty."""
    from scipy import ndimage
    if not pred.any() or not ref.any():
        return None, None
    def surface(m):
        return m & ~ndimage.binary_erosion(m)
    sp, sr = surface(pred), surface(ref)
    return (ndimage.distance_transform_edt(~sr, sampling=spacing)[sp],
            ndimage.distance_transform_edt(~sp, sampling=spacing)[sr])


def case_metrics(pred: np.ndarray, ref: np.ndarray, labels: dict[str, int], groups: dict[str, list[str]],
                 spacing, hd95: bool = False, nsd_tolerance: float | None = None) -> dict[str, dict]:
    """Metrics per foreground label and per group, for one case (label values, not class indices)."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    out = {}
    for name, value in labels.items():
        if value == 0:
            continue
        out[name] = mask_metrics(pred == value, ref == value, voxel_ml, spacing, hd95, nsd_tolerance)
    for g, members in groups.items():
        vals = [labels[m] for m in members]
        out[g] = mask_metrics(np.isin(pred, vals), np.isin(ref, vals), voxel_ml, spacing, hd95, nsd_tolerance)
    return out


def _case_files(folder: Path) -> dict[str, Path]:
    out = {}
    for p in sorted(Path(folder).iterdir()):
        for end in ENDINGS:
            if p.name.endswith(end) and not p.name.startswith("."):
                out[p.name[: -len(end)]] = p
    return out


def evaluate_folder(pred_dir: Path, ref_dir: Path, plan_path: Path | None = None, hd95: bool = False,
                    nsd_tolerance: float | None = None,
                    labels: dict[str, int] | None = None, groups: dict[str, list[str]] | None = None) -> str:
    """Evaluate every prediction that has a reference; writes metrics.csv and summary.yaml in pred_dir."""
    if plan_path is not None:
        from planner.plan import load_plan
        plan = load_plan(plan_path, check_paths=False)
        labels, groups = plan.dataset.labels, plan.dataset.label_groups
    preds, refs = _case_files(pred_dir), _case_files(ref_dir)
    if labels is None:
        values = sorted({int(v) for p in refs.values() for v in np.unique(read_label(p)[0])} | {0})
        labels = {("background" if v == 0 else f"label_{v}"): v for v in values}
    groups = groups or {}
    missing = sorted(set(refs) & set(preds) ^ set(preds))
    if not set(preds) & set(refs):
        raise FileNotFoundError(f"no prediction in {pred_dir} has a reference in {ref_dir}")
    rows = []
    for cid in sorted(set(preds) & set(refs)):
        pred, pg = read_label(preds[cid])
        ref, rg = read_label(refs[cid])
        if pred.shape != ref.shape:
            raise ValueError(f"{preds[cid]}: shape {pred.shape} differs from the reference {ref.shape}")
        for cls, m in case_metrics(pred, ref, labels, groups, rg.spacing, hd95, nsd_tolerance).items():
            rows.append({"case": cid, "class": cls, **m})
    write_rows(rows, Path(pred_dir) / "metrics.csv")
    summary = summarize_rows(rows)
    if missing:
        summary["predictions_without_reference"] = missing
    atomic_write_text(Path(pred_dir) / "summary.yaml", yaml.safe_dump(to_plain(summary), sort_keys=False))
    return format_summary(summary)


def summarize_rows(rows: list[dict]) -> dict:
    """Per class: mean and median of each metric over cases, and how many had an empty reference."""
    out: dict = {"cases": len({r["case"] for r in rows}), "classes": {}}
    for cls in dict.fromkeys(r["class"] for r in rows):
        sel = [r for r in rows if r["class"] == cls]
        entry = {}
        for m in METRICS + ("hd95_mm", "surface_dice"):
            vals = np.array([r[m] for r in sel if m in r], dtype=float)
            if vals.size:
                entry[m] = {"mean": float(np.nanmean(vals)) if np.any(~np.isnan(vals)) else None,
                            "median": float(np.nanmedian(vals)) if np.any(~np.isnan(vals)) else None}
        entry["empty_reference_cases"] = int(sum(bool(r["empty_reference"]) for r in sel))
        out["classes"][cls] = entry
    return out


def format_summary(summary: dict) -> str:
    lines = [f"{summary['cases']} cases", f"{'class':<18}{'Dice':>8}{'Sens':>8}{'Spec':>8}{'IoU':>8}   (mean over cases)"]
    for cls, e in summary["classes"].items():
        vals = [e.get(m, {}).get("mean") for m in ("dice", "sensitivity", "specificity", "iou")]
        lines.append(f"{cls:<18}" + "".join(f"{v:>8.3f}" if v is not None else f"{'-':>8}" for v in vals))
    return "\n".join(lines)
