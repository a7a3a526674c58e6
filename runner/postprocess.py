"""Postprocessing decided on cross-validation, as nnU-Net does: keep only the largest connected
component of all foreground together, then of each class and each label group, where the
out-of-fold predictions say it helps.

A rule is kept only if it raises the mean Dice (over the folds' validation cases) of the classes it
touches and lowers no other class's. The decision, with its before/after figures per class, goes
to WORK/postprocessing.yaml (readable and editable; checked on every read); `segplan predict`
applies it. Connected components by scipy.ndimage (26-connectivity in 3D).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from planner.dataset import read_label
from planner.fileio import image_files, write_text
from planner.schema import Reader, SchemaError, doc, dump_yaml, load_yaml_with_lines
from runner.evaluate import case_metrics, mask_metrics
from runner.workspace import Workspace

MIN_GAIN = 1e-4   # a rule must raise the mean Dice of what it touches by more than this
STRUCTURE = np.ones((3, 3, 3), bool)


@dataclass(frozen=True)
class Rule:
    keep_largest: str = doc("'foreground', a class or a label group: only its largest connected component is kept")
    labels: list[int] = doc("the label values it covers; voxels of these outside the largest component become background")


@dataclass(frozen=True)
class Postprocessing:
    folds: list[int] = doc("the folds whose validation predictions decided it")
    rules: list[Rule] = doc("applied in this order to every prediction")
    tried: dict[str, dict[str, list[float]]] = doc("per candidate rule, per class: mean Dice [before, after] on the out-of-fold predictions")


def keep_largest(labels: np.ndarray, values: list[int]) -> np.ndarray:
    """Set to background every voxel of ``values`` outside the largest connected component of their union."""
    mask = np.isin(labels, values)
    comp, n = ndimage.label(mask, STRUCTURE)
    if n <= 1:
        return labels
    sizes = np.bincount(comp.ravel())
    sizes[0] = 0
    out = labels.copy()
    out[mask & (comp != int(np.argmax(sizes)))] = 0
    return out


def apply(labels: np.ndarray, post: Postprocessing) -> np.ndarray:
    for rule in post.rules:
        labels = keep_largest(labels, rule.labels)
    return labels


def _candidates(ws: Workspace) -> list[Rule]:
    labels = {n: v for n, v in ws.plan.dataset.labels.items() if v != 0}
    rules = [Rule("foreground", sorted(labels.values()))] if len(labels) > 1 else []
    rules += [Rule(n, [v]) for n, v in labels.items()]
    rules += [Rule(g, sorted(labels[m] for m in members)) for g, members in ws.plan.dataset.label_groups.items()]
    return rules


def _mean_dice(cases: list[tuple[np.ndarray, np.ndarray]], labels: dict[str, int]) -> dict[str, float]:
    return {n: float(np.mean([mask_metrics(p == v, r == v, 1.0)["dice"] for p, r in cases]))
            for n, v in labels.items() if v != 0}


def out_of_fold(ws: Workspace):
    """(fold, case id, prediction path or None, reference path) of every evaluated validation case."""
    for fold in ws.folds():
        if fold.validation_summary.exists():
            preds = image_files(fold.validation)
            for cid, ref in image_files(fold.validation_reference).items():
                yield fold.index, cid, preds.get(cid), ref


def decide(ws: Workspace) -> Postprocessing:
    """Try each candidate rule on the out-of-fold predictions, keep those that help, in order."""
    cases, folds = [], []
    for k, _, pred, ref in out_of_fold(ws):
        folds += [] if k in folds else [k]
        if pred is not None:
            cases.append((read_label(pred)[0], read_label(ref)[0]))
    if not cases:
        raise FileNotFoundError(f"no out-of-fold predictions in {ws.root}: run the folds first")
    labels = ws.plan.dataset.labels
    value_of = {n: v for n, v in labels.items() if v != 0}
    kept, tried = [], {}
    current = cases
    before = _mean_dice(current, labels)
    for rule in _candidates(ws):
        trial = [(keep_largest(p, rule.labels), r) for p, r in current]
        after = _mean_dice(trial, labels)
        touched = [n for n, v in value_of.items() if v in rule.labels]
        gain = np.mean([after[n] for n in touched]) - np.mean([before[n] for n in touched])
        harms = [n for n in value_of if after[n] < before[n] - 1e-9]
        tried[rule.keep_largest] = {n: [round(before[n], 5), round(after[n], 5)] for n in value_of}
        if gain > MIN_GAIN and not harms:
            kept.append(rule)
            current, before = trial, after
    return Postprocessing(folds, kept, tried)


def postprocessed_rows(ws: Workspace, post: Postprocessing) -> dict[int, list[dict]]:
    """Per fold, the metric rows of its validation cases after ``post`` (the report's second row)."""
    plan = ws.plan
    out: dict[int, list[dict]] = {}
    for k, cid, pred_path, ref_path in out_of_fold(ws):
        ref, geom = read_label(ref_path)
        pred = apply(read_label(pred_path)[0], post) if pred_path is not None else None
        for cls, m in case_metrics(pred, ref, plan.dataset.labels, plan.dataset.label_groups, geom.spacing).items():
            out.setdefault(k, []).append({"case": cid, "class": cls, **m})
    return out


def save(post: Postprocessing, path: Path) -> None:
    write_text(path, dump_yaml(post, header="segplan postprocessing, decided on the cross-validation predictions.\n"
                                            "Edit or empty `rules` to change what `segplan predict` applies."))


def load(path: Path, labels: dict[str, int]) -> Postprocessing:
    """Read and check a postprocessing file; every problem named with its key and line."""
    data, lines = load_yaml_with_lines(path)
    reader = Reader(str(path), lines)
    post = reader.build(Postprocessing, data)
    if not reader.errors:
        known = set(labels.values()) - {0}
        for i, rule in enumerate(post.rules):
            bad = sorted(set(rule.labels) - known)
            if bad or not rule.labels:
                reader.error(f"rules.{i}.labels", f"{bad or '[]'} are not foreground label values of the plan "
                                                  f"{sorted(known)}")
    if reader.errors:
        raise SchemaError(reader.errors)
    return post


def _kept(post: Postprocessing) -> str:
    return ", ".join(f"largest component of {r.keep_largest}" for r in post.rules) or "nothing"


def postprocess_cv(ws: Workspace) -> tuple[Postprocessing, str]:
    """`segplan postprocess`: decide anew, write WORK/postprocessing.yaml, say what was kept."""
    post = decide(ws)
    save(post, ws.postprocessing)
    return post, (f"postprocessing decided on folds {post.folds}: keep {_kept(post)} -> {ws.postprocessing}"
                  + ("" if post.rules else " (no rule raised the Dice without lowering another)"))


def current(ws: Workspace, finished: list[int]) -> tuple[Postprocessing, str]:
    """The postprocessing for the report: the file as it is (hand edits kept) while it was decided
    on the folds finished now, else decided anew."""
    if ws.postprocessing.exists():
        post = load(ws.postprocessing, ws.plan.dataset.labels)
        if sorted(post.folds) == sorted(finished):
            return post, (f"postprocessing from {ws.postprocessing} (keep {_kept(post)}); "
                          "`segplan postprocess` decides it again")
    return postprocess_cv(ws)

