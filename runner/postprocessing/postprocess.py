"""Postprocessing decided on cross-validation, as nnU-Net does: keep only the largest connected
component of all foreground together, then of each class and each label group, where the
out-of-fold predictions say it helps -- and, unlike nnU-Net, only where the references say the
structure is one piece.

nnU-Net judges a rule on the predictions alone, so predictions that join the two lungs by a thin
bridge and carry stray pieces make "largest component of all foreground" look good, and applied
to a good prediction it deletes a whole lung. Here a rule is a candidate only if the references of
the evaluated cases show its structure as one piece (no ``split_pieces`` in at least
``ONE_PIECE_SHARE`` of the cases where it is present); it is kept only if it raises the mean Dice
(over the folds' validation cases) of the classes it touches, lowers no other class's, and,
applied to the references themselves (a perfect prediction), lowers no class's mean Dice by more
than ``MAX_REFERENCE_LOSS``. The decision, with its before/after figures per class and why each
candidate was dropped, goes to WORK/postprocessing.yaml (readable and editable; checked on every
read); `segplan predict` applies it. Connected components by scipy.ndimage (26-connectivity in 3D).

A region plan's candidates are its regions (the voxels of a region's label values outside its
largest component become background), each judged by the Dice of every region; with an ignore
label the Dice counts the references' annotated voxels only (a reference annotated on a few
slices shows its structures in pieces, so few rules are candidates there).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from segplan.planner.dataset import read_label
from segplan.planner.fileio import image_files, write_text
from segplan.planner.schema import Reader, SchemaError, doc, dump_yaml, load_yaml_with_lines
from segplan.runner.evaluation.evaluate import case_metrics, mask_metrics
from segplan.planner.labels import LabelModel, label_model, mask_of
from segplan.runner.workspace import Workspace

MIN_GAIN = 1e-4   # a rule must raise the mean Dice of what it touches by more than this
STRUCTURE = np.ones((3, 3, 3), bool)
# A structure is one piece in a case when its second-largest connected component is smaller than
# this fraction of its largest: annotation specks and a cut-off tip are far below a tenth of an
# organ, while the second of two lungs or kidneys, or another lesion, is not (the left lung is about
# 0.85 of the right).
ONE_PIECE_FRACTION = 0.1
# A rule is a candidate when its structure is one piece in at least this share of the references
# where it is present: a structure split in more than one case in ten is anatomy in two pieces (two
# lungs, several lesions), not an annotation oddity; what the few split cases would lose is weighed
# by MAX_REFERENCE_LOSS.
ONE_PIECE_SHARE = 0.9
# The kept rules together, applied to the references (a perfect prediction), may lower a class's
# mean Dice by at most this: enough to clear specks of a few voxels in the annotations, far too
# little to delete a structure in any case.
MAX_REFERENCE_LOSS = 1e-4


@dataclass(frozen=True)
class Rule:
    keep_largest: str = doc("'foreground', a class or a label group: only its largest connected component is kept")
    labels: list[int] = doc("the label values it covers; voxels of these outside the largest component become background")


@dataclass(frozen=True)
class Postprocessing:
    folds: list[int] = doc("the folds whose validation predictions decided it")
    rules: list[Rule] = doc("applied in this order to every prediction")
    tried: dict[str, dict[str, list[float]]] = doc("per candidate rule, per class: mean Dice [before, after] on the out-of-fold predictions")
    dropped: dict[str, str] = doc("per candidate rule not kept, why (files written before this field load with none)",
                                  default_factory=dict)


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of ``mask`` (26-connected in 3D) and their sizes (index 0 = background, 0)."""
    comp, _ = ndimage.label(mask, STRUCTURE)
    sizes = np.bincount(comp.ravel())
    sizes[0] = 0
    return comp, sizes


def keep_largest(labels: np.ndarray, values: list[int]) -> np.ndarray:
    """Set to background every voxel of ``values`` outside the largest connected component of their union."""
    mask = np.isin(labels, values)
    comp, sizes = _components(mask)
    if len(sizes) <= 2:
        return labels
    out = labels.copy()
    out[mask & (comp != int(np.argmax(sizes)))] = 0
    return out


def split_pieces(labels: np.ndarray, values: list[int]) -> tuple[int, int] | None:
    """None where the union of ``values`` is absent or one piece (its second-largest component below
    ONE_PIECE_FRACTION of the largest); else the label values that fill most of its two largest pieces."""
    comp, sizes = _components(np.isin(labels, values))
    order = np.argsort(sizes)[::-1]
    if len(sizes) <= 2 or sizes[order[1]] < ONE_PIECE_FRACTION * sizes[order[0]]:
        return None
    main = [int(np.bincount(labels[comp == c].ravel()).argmax()) for c in order[:2]]
    return main[0], main[1]


def anatomy(references: list[np.ndarray], rule: Rule, names: dict[int, str]) -> str | None:
    """Why ``rule`` is no candidate (the references show its structure in pieces), or None."""
    present = [r for r in references if np.isin(r, rule.labels).any()]
    if not present:
        return "absent from every reference"
    splits = [tuple(sorted(s)) for s in (split_pieces(r, rule.labels) for r in present) if s is not None]
    if len(present) - len(splits) >= ONE_PIECE_SHARE * len(present):
        return None
    pair = max(set(splits), key=splits.count)
    return (f"references show 2 or more pieces in {len(splits)}/{len(present)} cases (second-largest piece at "
            f"least {ONE_PIECE_FRACTION:g} of the largest; most often {names[pair[0]]} and {names[pair[1]]}): "
            f"one piece is needed in {ONE_PIECE_SHARE:.0%} of them")


def apply(labels: np.ndarray, post: Postprocessing) -> np.ndarray:
    for rule in post.rules:
        labels = keep_largest(labels, rule.labels)
    return labels


def candidates(lm: LabelModel) -> list[Rule]:
    """All foreground (when there are several classes, and it is not a region already), then each
    class (each region of a region plan), then each label group."""
    scored, labels = lm.structures, lm.labels
    every = sorted(v for v in labels.values() if v != 0)
    whole = len(scored) > 1 and every not in [sorted(v) for v in scored.values()]
    rules = [Rule("foreground", every)] if whole else []
    rules += [Rule(n, sorted(v)) for n, v in scored.items()]
    rules += [Rule(g, sorted(labels[m] for m in members)) for g, members in lm.groups.items()]
    return rules


def _mean_dice(cases: list[tuple[np.ndarray, np.ndarray]], lm: LabelModel) -> dict[str, float]:
    """Mean Dice per scored structure (a label or a region) of (prediction, reference) pairs, on the
    references' annotated voxels."""
    return {n: float(np.mean([mask_metrics(mask_of(p, v), mask_of(r, v), 1.0, annotated=lm.annotated(r))
                              ["dice"] for p, r in cases]))
            for n, v in lm.structures.items()}


def out_of_fold(ws: Workspace):
    """(fold, case id, prediction path or None, reference path) of every evaluated validation case."""
    for fold in ws.folds():
        if fold.validation_summary.exists():
            preds = image_files(fold.validation)
            for cid, ref in image_files(fold.validation_reference).items():
                yield fold.index, cid, preds.get(cid), ref


def choose(cases: list[tuple[np.ndarray | None, np.ndarray]], lm: LabelModel, folds: list[int]) -> Postprocessing:
    """Try each candidate rule in order on the (prediction or None, reference) pairs; keep those that
    the references show as one piece, that help the predictions and that spare the references.
    The rules and Dice are per structure of ``lm`` (per region for a region plan), the Dice of the
    references' annotated voxels (``lm``'s ignore label left out)."""
    predicted = [(p, r) for p, r in cases if p is not None]
    references = [r for _, r in cases]
    scored = lm.structures
    names = {v: n for n, v in lm.labels.items()}
    kept, tried, dropped = [], {}, {}
    current, refs_now = predicted, references
    before = _mean_dice(current, lm)
    for rule in candidates(lm):
        name = rule.keep_largest
        trial = [(keep_largest(p, rule.labels), r) for p, r in current]
        after = _mean_dice(trial, lm)
        touched = [n for n, v in scored.items() if set(v) & set(rule.labels)]
        gain = np.mean([after[n] for n in touched]) - np.mean([before[n] for n in touched])
        harms = [n for n in scored if after[n] < before[n] - 1e-9]
        tried[name] = {n: [round(before[n], 5), round(after[n], 5)] for n in scored}
        why = anatomy(references, rule, names)
        if why is None and harms:
            why = "lowers " + ", ".join(f"{n} {before[n]:.5f} -> {after[n]:.5f}" for n in harms) + " on the predictions"
        elif why is None and gain <= MIN_GAIN:
            why = (f"raises the mean Dice of what it touches by {gain:.5f} on the predictions "
                   f"(needs more than {MIN_GAIN:g})")
        if why is None:   # the kept rules and this one, applied to a perfect prediction
            refs_trial = [keep_largest(r, rule.labels) for r in refs_now]
            on_refs = _mean_dice(list(zip(refs_trial, references)), lm)
            lost = {n: d for n, d in on_refs.items() if d < 1.0 - MAX_REFERENCE_LOSS}
            if lost:
                why = ("applied to the references it lowers " + ", ".join(f"{n} 1 -> {d:.5f}" for n, d in lost.items())
                       + f" (more than {MAX_REFERENCE_LOSS:g}): it deletes true structure")
        if why is None:
            kept.append(rule)
            current, before, refs_now = trial, after, refs_trial
        else:
            dropped[name] = why
    return Postprocessing(folds, kept, tried, dropped)


def decide(ws: Workspace) -> Postprocessing:
    """Read the folds' out-of-fold predictions and references, then ``choose``."""
    cases, folds = [], []
    for k, _, pred, ref in out_of_fold(ws):
        folds += [] if k in folds else [k]
        cases.append((read_label(pred)[0] if pred is not None else None, read_label(ref)[0]))
    if not any(p is not None for p, _ in cases):
        raise FileNotFoundError(f"no out-of-fold predictions in {ws.root}: run the folds first")
    return choose(cases, label_model(ws.plan), folds)


def postprocessed_rows(ws: Workspace, post: Postprocessing) -> dict[int, list[dict]]:
    """Per fold, the metric rows of its validation cases after ``post`` (the report's second row)."""
    lm = label_model(ws.plan)
    out: dict[int, list[dict]] = {}
    for k, cid, pred_path, ref_path in out_of_fold(ws):
        ref, geom = read_label(ref_path)
        pred = apply(read_label(pred_path)[0], post) if pred_path is not None else None
        for cls, m in case_metrics(pred, ref, lm, geom.spacing).items():
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
        check_rules(reader, post, labels)
    if reader.errors:
        raise SchemaError(reader.errors)
    return post


def check_rules(reader: Reader, post: Postprocessing, labels: dict[str, int], key: str = "") -> None:
    """Each rule must cover foreground label values of the plan (``key``: where ``post`` sits in its file)."""
    known = set(labels.values()) - {0}
    for i, rule in enumerate(post.rules):
        bad = sorted(set(rule.labels) - known)
        if bad or not rule.labels:
            reader.error(f"{key}rules.{i}.labels", f"{bad or '[]'} are not foreground label values of the plan "
                                                   f"{sorted(known)}")


def note(post: Postprocessing, where) -> str:
    """The line prediction prints before it starts: the rules it applies and the file they came from."""
    return f"postprocessing: {', '.join(r.keep_largest for r in post.rules) or 'none'} ({where})"


def _kept(post: Postprocessing) -> str:
    return ", ".join(f"largest component of {r.keep_largest}" for r in post.rules) or "nothing"


def postprocess_cv(ws: Workspace) -> tuple[Postprocessing, str]:
    """`segplan postprocess`: decide anew, write WORK/postprocessing.yaml, say what was kept."""
    post = decide(ws)
    save(post, ws.postprocessing)
    return post, (f"postprocessing decided on folds {post.folds}: keep {_kept(post)} -> {ws.postprocessing}"
                  + ("" if post.rules else " (no rule raised the Dice without lowering another or splitting"
                                           " what the references show as one piece; see `dropped` in the file)"))


def current(ws: Workspace, finished: list[int]) -> tuple[Postprocessing, str]:
    """The postprocessing for the report: the file as it is (hand edits kept) while it was decided
    on the folds finished now, else decided anew."""
    if ws.postprocessing.exists():
        post = load(ws.postprocessing, ws.plan.dataset.labels)
        if sorted(post.folds) == sorted(finished):
            return post, (f"postprocessing from {ws.postprocessing} (keep {_kept(post)}); "
                          "`segplan postprocess` decides it again")
    return postprocess_cv(ws)

