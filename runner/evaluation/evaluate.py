"""Per case and class: Dice, sensitivity, specificity (the paper's formulas from the confusion
matrix), IoU, volumes in ml; optional 95% Hausdorff distance and normalised surface Dice (surface
elements, Nikolov et al.). A label group (lungs = left + right) is the mean of its members, as the
paper reports it, and its union is a row of its own. Results as CSV per case and a YAML summary.

A value that is undefined for a case (sensitivity with nothing to detect, HD95 with an empty mask)
is NaN in the CSV and left out of the mean, and the summary says how many cases it left out and
why; it is never counted as 0 or 1. Where a convention gives such a case a number (BraTS scores a
missed structure's HD95 as the image diagonal) that number is its own, named column.

A region plan (dataset.regions) is scored per region, by its name, as nnU-Net evaluates region
datasets; with an ignore label the references' unannotated voxels are left out of every count
and surface, and the summary says how many there were."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from segplan.planner.dataset import read_label
from segplan.planner.fileio import image_files, write_yaml
from segplan.planner.schema import to_plain
from segplan.planner.labels import LabelModel, mask_of
from segplan.runner.evaluation.tables import write_rows

METRICS = ("dice", "sensitivity", "specificity", "iou", "pred_ml", "ref_ml")
DISTANCE_METRICS = ("hd95_mm", "hd95_diag_mm", "surface_dice")
GROUP_MEAN_METRICS = ("dice", "sensitivity", "specificity", "iou") + DISTANCE_METRICS
CONVENTIONS = {
    "sensitivity": "TP/(TP+FN); undefined (NaN, left out of the mean) where the reference is empty: nothing to detect",
    "specificity": "TN/(TN+FP); undefined where the reference fills the image",
    "hd95_mm": "95th percentile of the surface distances (mm) where both masks are non-empty; otherwise undefined "
               "and left out of the mean: `defined` cases averaged, `missed` counts the structures in the reference "
               "that nothing was predicted for",
    "hd95_diag_mm": "hd95_mm with every case scored, as BraTS does: a structure missed or predicted where the "
                    "reference has none scores the image diagonal in mm (BraTS: 374 mm, its 240x240x155 1 mm "
                    "volume's 373.1), both masks empty 0; compare with tables that use this convention",
}


def image_diagonal_mm(shape, spacing) -> float:
    """Length of the image's diagonal in mm: the farthest two points of the volume can be apart."""
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing))))


def confusion(pred: np.ndarray, ref: np.ndarray) -> tuple[int, int, int, int]:
    """(TP, FP, FN, TN) of two boolean masks."""
    tp = int(np.count_nonzero(pred & ref))
    fp = int(np.count_nonzero(pred & ~ref))
    fn = int(np.count_nonzero(~pred & ref))
    return tp, fp, fn, int(pred.size) - tp - fp - fn


def mask_metrics(pred: np.ndarray, ref: np.ndarray, voxel_ml: float, spacing=None, hd95: bool = False,
                 nsd_tolerance: float | None = None, annotated: np.ndarray | None = None) -> dict:
    """Dice = 2TP/(2TP+FP+FN), sensitivity = TP/(TP+FN), specificity = TN/(TN+FP), IoU = TP/(TP+FP+FN).

    Empty reference: sensitivity is undefined (NaN: there is nothing to detect, so neither 0 nor 1
    would be a measurement) and ``empty_reference`` is set; Dice and IoU are 1.0 if the prediction is
    empty too, else 0. Specificity is likewise NaN where the reference fills the image. ``missed``:
    the reference has the structure and the prediction none of it.

    HD95 and surface Dice follow Nikolov et al.'s surface-element definition (DeepMind's
    surface-distance library; ``spacing`` in (z, y, x) like the arrays). Where either mask is empty
    ``hd95_mm`` is undefined: NaN here, counted as such in the summary, never averaged away.
    ``hd95_diag_mm`` is the same distance with those cases scored as BraTS scores them (its
    evaluation replaces the infinite distance of an empty mask by 374 mm, the diagonal of its
    240x240x155 volumes at 1 mm; both masks empty score 0): here the diagonal of this image in mm
    (``image_diagonal_mm``), so that a model cannot improve the mean by missing a structure. Surface
    Dice is 1 if both masks are empty, else 0 where one is.

    ``annotated``: the reference's annotated voxels (LabelModel.annotated); every count, TN
    included, and the surfaces are then of those voxels only (nnU-Net's compute_tp_fp_fn_tn with an
    ignore mask)."""
    if annotated is not None:
        pred, ref = pred & annotated, ref & annotated
    tp, fp, fn, tn = confusion(pred, ref)
    if annotated is not None:
        tn -= int(annotated.size - np.count_nonzero(annotated))
    empty, nothing_predicted = tp + fn == 0, tp + fp == 0
    out = {"dice": 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 1.0,
           "sensitivity": tp / (tp + fn) if (tp + fn) else math.nan,
           "specificity": tn / (tn + fp) if (tn + fp) else math.nan,
           "iou": tp / (tp + fp + fn) if (tp + fp + fn) else 1.0,
           "pred_ml": (tp + fp) * voxel_ml, "ref_ml": (tp + fn) * voxel_ml, "empty_reference": bool(empty),
           "missed": bool(nothing_predicted and not empty)}
    if hd95 or nsd_tolerance is not None:
        import surface_distance
        both = not (empty or nothing_predicted)
        dist = surface_distance.compute_surface_distances(ref, pred, tuple(float(s) for s in spacing)) if both else None
        if hd95:
            out["hd95_mm"] = float(surface_distance.compute_robust_hausdorff(dist, 95)) if both else math.nan
            out["hd95_diag_mm"] = (out["hd95_mm"] if both else 0.0 if empty and nothing_predicted
                                   else image_diagonal_mm(ref.shape, spacing))
        if nsd_tolerance is not None:
            out["surface_dice"] = (float(surface_distance.compute_surface_dice_at_tolerance(dist, nsd_tolerance))
                                   if both else float(empty and nothing_predicted))
    return out


def missing_metrics(ref: np.ndarray, voxel_ml: float, spacing, hd95: bool, nsd_tolerance: float | None) -> dict:
    """A reference without a prediction scores zero on every overlap metric (and is listed by name);
    sensitivity stays undefined for an empty reference, and the distances are those of an empty
    prediction."""
    empty = not bool(ref.any())
    out = {"dice": 0.0, "sensitivity": math.nan if empty else 0.0, "specificity": 0.0, "iou": 0.0, "pred_ml": 0.0,
           "ref_ml": int(np.count_nonzero(ref)) * voxel_ml, "empty_reference": empty, "missed": not empty}
    if hd95:
        out["hd95_mm"] = math.nan
        out["hd95_diag_mm"] = 0.0 if empty else image_diagonal_mm(ref.shape, spacing)
    if nsd_tolerance is not None:
        out["surface_dice"] = 0.0
    return out


def case_metrics(pred: np.ndarray | None, ref: np.ndarray, lm: LabelModel, spacing, hd95: bool = False,
                 nsd_tolerance: float | None = None) -> dict[str, dict]:
    """Metrics per structure of ``lm`` (each foreground label, or each region of a region plan) and
    per label group, for one case (label values, not class indices), on the voxels the reference
    annotates (``lm``'s ignore label is left out).

    A group (the paper's lungs = left + right) is scored as the paper does: under its own name the
    mean of its members' metrics, so a left/right swap scores as wrong as it is; the union of its
    members is its own row, ``<group>_union``. A group's value is undefined where a member's is (a
    missed member leaves the group's HD95 undefined, and the group ``missed``). ``pred`` None: the
    prediction is missing."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    ann = lm.annotated(ref)
    labels = lm.labels

    def score(p_mask, r_mask):
        if p_mask is None:
            return missing_metrics(r_mask, voxel_ml, spacing, hd95, nsd_tolerance)
        return mask_metrics(p_mask, r_mask, voxel_ml, spacing, hd95, nsd_tolerance, ann)
    out = {}
    for name, values in lm.structures.items():
        out[name] = score(None if pred is None else mask_of(pred, values), mask_of(ref, values))
    for g, members in lm.groups.items():
        rows = [out[m] for m in members]
        out[g] = {m: float(np.mean([r[m] for r in rows])) for m in GROUP_MEAN_METRICS if m in rows[0]}
        out[g] |= {"pred_ml": sum(r["pred_ml"] for r in rows), "ref_ml": sum(r["ref_ml"] for r in rows),
                   "empty_reference": all(r["empty_reference"] for r in rows),
                   "missed": any(r["missed"] for r in rows)}
        vals = [labels[m] for m in members]
        out[f"{g}_union"] = score(None if pred is None else np.isin(pred, vals), np.isin(ref, vals))
    for m in out.values():
        m["missing_prediction"] = pred is None
    return out


def evaluate_folder(pred_dir: Path, ref_dir: Path, plan_path: Path | None = None, hd95: bool = False,
                    nsd_tolerance: float | None = None, lm: LabelModel | None = None,
                    notes: dict | None = None) -> str:
    """Evaluate every reference against its prediction; writes metrics.csv and summary.yaml in pred_dir.

    What is scored comes from ``lm`` (or the plan at ``plan_path``; with neither, every value found
    in the references is a label): per label or per region, label groups, and with an ignore label
    the references' annotated voxels only (the summary says how many were left out). A reference
    with no prediction counts as Dice 0 (every overlap metric 0) and is listed under
    ``missing_predictions``; predictions with no reference are listed too. ``notes`` (e.g. which
    checkpoint predicted) are written into the summary beside the numbers."""
    if plan_path is not None:
        from segplan.planner.labels import label_model
        from segplan.planner.plan_file import load_plan
        lm = label_model(load_plan(plan_path, check_paths=False))
    preds, refs = image_files(pred_dir), image_files(ref_dir)
    if not refs:
        raise FileNotFoundError(f"no reference label files in {ref_dir}")
    if lm is None:
        values = sorted({int(v) for p in refs.values() for v in np.unique(read_label(p)[0])} | {0})
        lm = LabelModel({("background" if v == 0 else f"label_{v}"): v for v in values})
    if not set(preds) & set(refs):
        raise FileNotFoundError(f"no prediction in {pred_dir} has a reference in {ref_dir}")
    rows, ignored, total = [], 0, 0
    for cid in sorted(refs):
        ref, rg = read_label(refs[cid])
        pred = None
        if cid in preds:
            pred, _ = read_label(preds[cid])
            if pred.shape != ref.shape:
                raise ValueError(f"{preds[cid]}: shape {pred.shape} differs from the reference {ref.shape}")
        for cls, m in case_metrics(pred, ref, lm, rg.spacing, hd95, nsd_tolerance).items():
            rows.append({"case": cid, "class": cls, **m})
        ignored += int(np.count_nonzero(ref == lm.ignore_label)) if lm.has_ignore else 0
        total += ref.size
    write_rows(rows, Path(pred_dir) / "metrics.csv")
    summary = summarize_rows(rows)
    summary["missing_predictions"] = sorted(set(refs) - set(preds))
    summary["predictions_without_reference"] = sorted(set(preds) - set(refs))
    summary |= notes or {}
    if lm.has_ignore:
        summary["ignored"] = ignore_note(lm.ignore_label, ignored, total)
    summary["conventions"] = {m: text for m, text in CONVENTIONS.items() if any(m in r for r in rows)}
    write_yaml(Path(pred_dir) / "summary.yaml", to_plain(summary))
    return format_summary(summary)


def ignore_note(ignore_label: int, ignored: int, total: int) -> str:
    """What evaluation left out because nobody annotated it, in words (summary and report)."""
    return (f"ignore label {ignore_label}: {ignored} of the references' {total} voxels ({ignored / max(total, 1):.1%}) "
            "are not annotated and were not scored (every count, TN included, and every surface is of the annotated "
            "voxels)")


def summarize_rows(rows: list[dict]) -> dict:
    """Per class: mean and median of each metric over cases, and how many had an empty reference.

    A value undefined for a case (sensitivity with an empty reference, HD95 with an empty mask) is
    never silently dropped or counted as 0: the entry gives the mean over the ``defined`` cases and
    how many were ``undefined``; HD95's entry always says how many of its cases were ``missed`` (a
    structure of the reference predicted nowhere), which ``hd95_diag_mm`` scores instead."""
    out: dict = {"cases": len({r["case"] for r in rows}), "classes": {}}
    for cls in dict.fromkeys(r["class"] for r in rows):
        sel = [r for r in rows if r["class"] == cls]
        entry = {}
        for m in METRICS + DISTANCE_METRICS:
            vals = np.array([r[m] for r in sel if m in r], dtype=float)
            if not vals.size:
                continue
            ok = vals[~np.isnan(vals)]
            entry[m] = {"mean": float(ok.mean()) if ok.size else None,
                        "median": float(np.median(ok)) if ok.size else None}
            if ok.size < vals.size or m == "hd95_mm":
                entry[m] |= {"defined": int(ok.size), "undefined": int(vals.size - ok.size)}
            if m == "hd95_mm":
                entry[m]["missed"] = int(sum(bool(r.get("missed", False)) for r in sel if m in r))
        entry["empty_reference_cases"] = int(sum(bool(r["empty_reference"]) for r in sel))
        entry["missing_prediction_cases"] = int(sum(bool(r.get("missing_prediction", False)) for r in sel))
        out["classes"][cls] = entry
    return out


def _undefined_line(cls: str, m: str, e: dict) -> str:
    """Why a metric's mean leaves cases out, and how many (a group's value is undefined where a member's is)."""
    if m == "sensitivity":
        why = "the reference is empty: nothing to detect"
    elif m == "hd95_mm":
        why = (f"{e['missed']} missed: the structure predicted nowhere; {e['undefined'] - e['missed']} with an "
               "empty reference; hd95_diag_mm scores them all")
    else:
        why = "an empty mask"
    return f"{cls}: {m} undefined for {e['undefined']} case(s) ({why}); the mean is over the other {e['defined']}"


def format_summary(summary: dict) -> str:
    cols = [("dice", "Dice"), ("sensitivity", "Sens"), ("specificity", "Spec"), ("iou", "IoU")]
    first = next(iter(summary["classes"].values()), {})
    cols += [(m, h) for m, h in (("hd95_mm", "HD95mm"), ("hd95_diag_mm", "HD95diag"), ("surface_dice", "NSD"))
             if m in first]
    lines = [f"{summary['cases']} cases", f"{'class':<18}" + "".join(f"{h:>9}" for _, h in cols) + "   (mean over cases)"]
    for cls, e in summary["classes"].items():
        vals = [e.get(m, {}).get("mean") for m, _ in cols]
        lines.append(f"{cls:<18}" + "".join(f"{v:>9.3f}" if v is not None else f"{'n/a':>9}" for v in vals))
    for cls, e in summary["classes"].items():
        for m, _ in cols:
            if e.get(m, {}).get("undefined"):
                lines.append(_undefined_line(cls, m, e[m]))
    if summary.get("missing_predictions"):
        lines.append(f"MISSING predictions, scored as Dice 0: {', '.join(summary['missing_predictions'])}")
    if summary.get("predictions_without_reference"):
        lines.append(f"predictions without a reference (not scored): {', '.join(summary['predictions_without_reference'])}")
    if summary.get("selection_note"):
        lines.append(f"NOTE: {summary['selection_note']}")
    if summary.get("ignored"):
        lines.append(f"NOTE: {summary['ignored']}")
    return "\n".join(lines)

