"""`segplan select`: the best configuration or pairwise ensemble on cross-validation, as nnU-Net's
find_best_configuration chooses it, and the file that records the choice (``selection.yaml``).

Every plan given must have all of its folds finished with their out-of-fold probabilities
(runner/evaluation/oof.py), the same split and the same labels; each is refused by name otherwise. Each plan
alone and every pair of them (the average of their probabilities: nnU-Net's ensembling) is scored on
every out-of-fold case by the plans' label model (segplan.planner.labels): the label map is made as
prediction makes it (arg-max, or a region plan's sigmoids thresholded in ``regions_class_order``),
scored by evaluation's code (per region for a region plan, the ignore label's voxels left out), and
the rank is the mean over the scored structures of the mean Dice over the cases, nnU-Net's
``foreground_mean``: as nnU-Net's compute_metrics, a case where a structure is absent from both the
prediction and the reference has no Dice for it (NaN, left out of that structure's mean; evaluation
and the CV report count it as 1 instead, and say so), and a structure absent from every case and
every prediction is ``null`` and left out of the rank. Ties go to the first listed: single
configurations before ensembles, the simpler choice. The winner's out-of-fold predictions then
decide its postprocessing as `segplan postprocess` does (runner/postprocessing/postprocess.py's
rules, per region, on the annotated voxels). A candidate is named by
its plans' configurations (``2d``, ``2d+3d_fullres``), by plan names where two plans share one.

The file is plain, commented YAML: the ranking with Dice per class and label group, the winner, its
postprocessing. It is checked on every read, each problem named by key and line. Editing ``winner``
picks another candidate of the ranking; the postprocessing was decided for ``postprocessing_for``
and is refused for another winner unless its rules are emptied (or ``postprocessing_for`` is edited
too, taking responsibility for it). `segplan predict --selection` and `segplan export --selection`
use the winner.
"""
from __future__ import annotations

import itertools
import math
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from segplan.planner.dataset import read_label
from segplan.planner.labels import LabelModel, label_model
from segplan.planner.plan import CONFIGURATIONS
from segplan.runner.postprocessing import postprocess
from segplan.runner.evaluation.evaluate import case_metrics
from segplan.runner.evaluation.oof import load_probabilities, require_finished, require_same_split
from segplan.runner.evaluation.selection_file import (  # noqa: F401  (the file's names, here too)
    DIGITS, SELECTION_VERSION, Candidate, Selection, SelectionError, load_selection, save_selection)
from segplan.runner.postprocessing.postprocess import Postprocessing
from segplan.runner.workspace import Workspace

def member_names(workspaces: list[Workspace]) -> list[str]:
    """Each plan's name in candidate names: its configuration; where two plans share one, plan names
    (then file names, then paths) for all, so that no two are alike."""
    for names in ([ws.plan.configuration for ws in workspaces], [ws.plan.name for ws in workspaces],
                  [ws.plan_path.stem for ws in workspaces]):
        if len(set(names)) == len(names):
            return names
    return [str(ws.plan_path) for ws in workspaces]


def candidate_members(workspaces: list[Workspace]) -> list[tuple[int, ...]]:
    """Indices of the plans in each candidate: every plan alone, then every pair; members in
    configuration order (2d, 3d_fullres, 3d_lowres, 3d_cascade_fullres), then as given."""
    order = sorted(range(len(workspaces)), key=lambda i: (CONFIGURATIONS.index(workspaces[i].plan.configuration), i))
    return [(i,) for i in order] + list(itertools.combinations(order, 2))


def _check_comparable(workspaces: list[Workspace]) -> None:
    seen: dict[Path, Path] = {}
    for ws in workspaces:
        key = ws.plan_path.resolve()
        if key in seen:
            raise SelectionError(f"{ws.plan_path} is given twice (as {seen[key]}): each plan once")
        seen[key] = ws.plan_path
    first = workspaces[0]
    lm = label_model(first.plan)
    for ws in workspaces[1:]:
        other = label_model(ws.plan)
        if not other.same_outputs(lm):
            what = "regions" if lm.has_regions or other.has_regions else "labels"
            raise SelectionError(f"{first.plan_path} and {ws.plan_path} segment other {what} ({lm.describe()[what]} "
                                 f"and {other.describe()[what]}): their probabilities cannot be averaged or compared")
        if other.ignore_label != lm.ignore_label:
            raise SelectionError(f"{first.plan_path} and {ws.plan_path} have other ignore labels ({lm.ignore_label} "
                                 f"and {other.ignore_label}): they would be scored on other voxels")
        if len(ws.plan.dataset.channels) != len(first.plan.dataset.channels):
            raise SelectionError(f"{first.plan_path} and {ws.plan_path} read {len(first.plan.dataset.channels)} and "
                                 f"{len(ws.plan.dataset.channels)} channels per case: one input cannot feed both")
    for ws in workspaces:
        require_finished(ws, "`segplan select`")
    require_same_split(workspaces)


def _prediction(probs: list[np.ndarray], members: tuple[int, ...], lm: LabelModel) -> np.ndarray:
    """The label map of a candidate: its members' probabilities averaged in float32, then made a
    label map as prediction does (arg-max, or a region plan's sigmoids thresholded in order)."""
    p = probs[members[0]].astype(np.float32)
    for i in members[1:]:
        p += probs[i]
    return lm.to_label_map(p / len(members))


def nnunet_dice(metrics: dict) -> float:
    """A structure's Dice in one case as nnU-Net's compute_metrics gives it: NaN where the structure
    is absent from both prediction and reference (segplan's evaluation counts that case as 1)."""
    return math.nan if metrics["empty_reference"] and metrics["pred_ml"] == 0 else metrics["dice"]


def mean_dice(values: list[float]) -> float | None:
    """The mean over the cases that have a Dice (nnU-Net's nanmean); None if none has."""
    ok = [v for v in values if not math.isnan(v)]
    return float(np.mean(ok)) if ok else None


def _out_of_fold(workspaces: list[Workspace], progress: bool, folds: list[int] | None = None):
    """(fold, case id, reference, spacing, each plan's probabilities) of every out-of-fold case (of
    ``folds`` only, if given)."""
    first = workspaces[0]
    label_files = {c.case_id: c.label_file for c in first.dataset.cases}
    pairs = [(k, cid) for k, s in enumerate(first.splits()) for cid in s["val"] if folds is None or k in folds]
    for k, cid in tqdm(pairs, desc="select", disable=not progress, unit="case"):
        ref, geom = read_label(label_files[cid])
        probs = [load_probabilities(ws, k, cid) for ws in workspaces]
        for ws, p in zip(workspaces, probs):
            if p.shape[1:] != ref.shape:
                raise SelectionError(f"{ws.fold(k).validation_probabilities(cid)}: probabilities of shape {p.shape[1:]}, "
                                     f"the reference {label_files[cid]} is {ref.shape}")
        yield k, cid, ref, geom.spacing, probs


def score(workspaces: list[Workspace], progress: bool = True,
          folds: list[int] | None = None) -> tuple[dict[str, tuple[int, ...]], dict[str, dict[str, list[float]]], int]:
    """Each candidate's members (by name), its Dice per class and case on the out-of-fold cases (of
    ``folds``, if given: a benchmark's fold 0), and the number of cases."""
    lm = label_model(workspaces[0].plan)
    names = member_names(workspaces)
    members = {"+".join(names[i] for i in m): m for m in candidate_members(workspaces)}
    dice: dict[str, dict[str, list[float]]] = {n: {} for n in members}
    n_cases = 0
    for _, _, ref, spacing, probs in _out_of_fold(workspaces, progress, folds):
        n_cases += 1
        for name, m in members.items():
            metrics = case_metrics(_prediction(probs, m, lm), ref, lm, spacing)
            values = {cls: nnunet_dice(metrics[cls]) for cls in lm.structures}
            for g, group in lm.groups.items():   # as evaluation: the mean of the members, here of theirs
                defined = [values[c] for c in group if not math.isnan(values[c])]
                values[g] = float(np.mean(defined)) if defined else math.nan
                values[f"{g}_union"] = nnunet_dice(metrics[f"{g}_union"])
            for cls, v in values.items():
                dice[name].setdefault(cls, []).append(v)
    return members, dice, n_cases


def select(plan_paths: list[Path], out: Path, progress: bool = True) -> tuple[Selection, str]:
    """Rank, decide the winner's postprocessing, write ``out`` (its folder made first, so that a
    path that cannot be written fails before the scoring); returns the selection and its table."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    workspaces = [Workspace(Path(p)) for p in plan_paths]
    _check_comparable(workspaces)
    lm = label_model(workspaces[0].plan)
    by_name, dice, n_cases = score(workspaces, progress)
    base = Path(out).resolve().parent
    ranking = []
    for name, m in by_name.items():
        means = {c: mean_dice(v) for c, v in dice[name].items()}
        ranked = [means[c] for c in lm.structures if means[c] is not None]
        ranking.append(Candidate(name, [os.path.relpath(workspaces[i].plan_path.resolve(), base) for i in m],
                                 round(float(np.mean(ranked)), DIGITS) if ranked else 1.0,
                                 {c: None if v is None else round(v, DIGITS) for c, v in means.items()}))
    ranking.sort(key=lambda c: -c.mean_foreground_dice)  # stable: ties keep singles first, as nnU-Net
    winner = ranking[0]
    chosen = by_name[winner.name]
    cases = [(_prediction(probs, chosen, lm), ref) for _, _, ref, _, probs in _out_of_fold(workspaces, False)]
    post = postprocess.choose(cases, lm, list(range(len(workspaces[0].folds()))))
    selection = Selection(SELECTION_VERSION, len(workspaces[0].folds()), n_cases, dict(lm.labels), winner.name,
                          winner.name, ranking, post, dict(lm.regions))
    save_selection(selection, Path(out))
    return selection, format_ranking(selection)


def format_ranking(sel: Selection) -> str:
    """The ranking as a table (mean foreground Dice, then Dice per class), the winner starred, and what it keeps."""
    classes = list(sel.ranking[0].dice) if sel.ranking else []
    width = max([len(c.name) for c in sel.ranking] + [9]) + 2
    head = f"  {'candidate':<{width}}{'mean fg':>9}" + "".join(f"{c[:12]:>13}" for c in classes)
    rows = [f"{'*' if c.name == sel.winner else ' '} {c.name:<{width}}{c.mean_foreground_dice:>9.4f}"
            + "".join(f"{c.dice[k]:>13.4f}" if c.dice[k] is not None else f"{'absent':>13}" for k in classes)
            for c in sel.ranking]
    kept = ", ".join(f"largest component of {r.keep_largest}" for r in sel.postprocessing.rules) or "nothing"
    return "\n".join([f"{sel.cases} out-of-fold cases, {sel.folds} folds; mean Dice (mean fg: over the foreground "
                      "classes, what ranks)", head, *rows,
                      f"winner: {sel.winner}; postprocessing decided on its out-of-fold predictions: keep {kept}"])


def winner_workspaces(path: Path) -> tuple[Selection, list[Workspace]]:
    """The selection in ``path`` and its winner's plans (as workspaces)."""
    sel = load_selection(path)
    cand = next(c for c in sel.ranking if c.name == sel.winner)
    return sel, [Workspace(Path(path).parent / rel) for rel in cand.plans]


def selection_stages(path: Path, folds: list[int] | None = None, tta: bool = True,
                     postprocessing: bool = True) -> tuple[list, Postprocessing | None, str]:
    """What `segplan predict --selection FILE` (and ``Predictor.from_selection``) predicts with: the
    winner's plans (``folds`` of each, default all) as stages, the selection's postprocessing unless
    told not to, and a line saying which."""
    from segplan.runner.inference.stages import workspace_stage
    sel, workspaces = winner_workspaces(Path(path))
    stages = [workspace_stage(ws, folds, tta) for ws in workspaces]
    post = sel.postprocessing if postprocessing else None
    note = (f"selection: {sel.winner} ({path}); postprocessing: "
            f"{', '.join(r.keep_largest for r in post.rules) or 'none' if post else 'off'}")
    return stages, post, note
