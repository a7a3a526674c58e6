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

import dataclasses
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
from segplan.runner.evaluation import settings_search
from segplan.runner.evaluation.evaluate import case_metrics
from segplan.runner.evaluation.oof import load_probabilities, require_finished, require_same_split
from segplan.runner.evaluation.selection_file import (  # noqa: F401  (the file's names, here too)
    DIGITS, SELECTION_VERSION, Candidate, Selection, SelectionError, format_ranking, load_selection, save_selection)
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


def named_candidates(workspaces: list[Workspace]) -> dict[str, tuple[int, ...]]:
    """Each candidate's name ('3d_fullres', '2d+3d_fullres') and the indices of its plans."""
    names = member_names(workspaces)
    return {"+".join(names[i] for i in m): m for m in candidate_members(workspaces)}


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
    members = named_candidates(workspaces)
    dice: dict[str, dict[str, list[float]]] = {n: {} for n in members}
    n_cases = 0
    for _, _, ref, spacing, probs in _out_of_fold(workspaces, progress, folds):
        n_cases += 1
        for name, m in members.items():
            for cls, v in case_dice(_prediction(probs, m, lm), ref, spacing, lm).items():
                dice[name].setdefault(cls, []).append(v)
    return members, dice, n_cases


def case_dice(prediction: np.ndarray, ref: np.ndarray, spacing, lm: LabelModel) -> dict[str, float]:
    """One case's Dice per structure (nnU-Net's: NaN where absent from both) and label group (the
    mean of its members', and of their union), by evaluation's code."""
    metrics = case_metrics(prediction, ref, lm, spacing)
    values = {cls: nnunet_dice(metrics[cls]) for cls in lm.structures}
    for g, group in lm.groups.items():   # as evaluation: the mean of the members, here of theirs
        defined = [values[c] for c in group if not math.isnan(values[c])]
        values[g] = float(np.mean(defined)) if defined else math.nan
        values[f"{g}_union"] = nnunet_dice(metrics[f"{g}_union"])
    return values


def _candidate(name: str, plans: list[str], dice: dict[str, list[float]], lm: LabelModel, **more) -> Candidate:
    """A ranking entry: the mean Dice per class over its cases and what ranks, their foreground mean."""
    means = {c: mean_dice(v) for c, v in dice.items()}
    ranked = [means[c] for c in lm.structures if means[c] is not None]
    return Candidate(name, plans, round(float(np.mean(ranked)), DIGITS) if ranked else 1.0,
                     {c: None if v is None else round(v, DIGITS) for c, v in means.items()}, **more)


def select(plan_paths: list[Path], out: Path, progress: bool = True, seconds_per_case: float | None = None,
           cases: int | None = settings_search.SAMPLE, overlaps: list[float] | None = None) -> tuple[Selection, str]:
    """Rank, decide the winner's postprocessing, write ``out`` (its folder made first, so that a
    path that cannot be written fails before the scoring); returns the selection and its table.
    ``seconds_per_case``: also vary the prediction settings (runner/evaluation/settings_search.py,
    on ``cases`` out-of-fold cases, None: all; window ``overlaps``) and choose the most accurate
    candidate that predicts a case within that many seconds here; none that does is refused, naming
    the fastest."""
    if seconds_per_case is not None:
        check_search_options(seconds_per_case, cases, overlaps)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    workspaces = [Workspace(Path(p)) for p in plan_paths]
    _check_comparable(workspaces)
    lm = label_model(workspaces[0].plan)
    base = Path(out).resolve().parent
    by_name = named_candidates(workspaces)
    plans = {name: [os.path.relpath(workspaces[i].plan_path.resolve(), base) for i in m] for name, m in by_name.items()}
    sample: list[tuple[int, str]] = []
    if seconds_per_case is None:
        _, dice, n_cases = score(workspaces, progress)
        ranking = [_candidate(name, plans[name], dice[name], lm) for name in by_name]
        ranking.sort(key=lambda c: -c.mean_foreground_dice)  # stable: ties keep singles first, as nnU-Net
        winner, configuration = ranking[0], ranking[0].name
    else:
        ranking, sample, config_of = _settings_ranking(workspaces, by_name, plans, lm, seconds_per_case, cases,
                                                       overlaps, progress)
        winner, n_cases = ranking[0], len(sample)
        within = [c for c in ranking if c.seconds_per_case <= seconds_per_case]
        if not within:
            fastest = min(ranking, key=lambda c: c.seconds_per_case)
            raise SelectionError(f"--seconds-per-case {seconds_per_case:g}: no candidate predicts a case that fast on "
                                 f"this machine; the fastest, '{fastest.name}', takes {fastest.seconds_per_case:.2f} s "
                                 f"per case (mean of {len(sample)} out-of-fold cases)")
        winner = within[0]
        configuration = config_of[winner.name]
    chosen = by_name[configuration]
    oof = [(_prediction(probs, chosen, lm), ref) for _, _, ref, _, probs in _out_of_fold(workspaces, False)]
    post = postprocess.choose(oof, lm, list(range(len(workspaces[0].folds()))))
    selection = Selection(SELECTION_VERSION, len(workspaces[0].folds()), n_cases, dict(lm.labels), winner.name,
                          winner.name, ranking, post, dict(lm.regions), seconds_per_case,
                          [cid for _, cid in sample], settings_search.machine() if sample else "")
    save_selection(selection, Path(out))
    return selection, format_ranking(selection)


def check_search_options(seconds_per_case: float, cases: int | None, overlaps: list[float] | None) -> None:
    """Refuse, by option, a time, sample or overlap that cannot be searched."""
    if not seconds_per_case > 0:
        raise SelectionError(f"--seconds-per-case {seconds_per_case:g}: a time in seconds above 0")
    if cases is not None and cases < 1:
        raise SelectionError(f"--cases {cases}: a number of cases above 0, or all")
    bad = [o for o in overlaps or [] if not 0.0 <= o < 1.0]
    if bad:
        raise SelectionError(f"--overlaps {bad[0]:g}: a window overlap within [0, 1)")


def _settings_ranking(workspaces, by_name, plans, lm, seconds_per_case, cases, overlaps, progress):
    """Every configuration with every prediction setting, scored and timed on a sample of the
    out-of-fold cases; ranked by Dice (a lower bound ties ahead of the one-fold score it carries: it
    is expected to meet or beat it), then by time. Returns the ranking, the sample and each
    candidate's configuration."""
    from segplan.runner.backend import name as backend_name
    from segplan.runner.inference.engines import installed
    wanted = sorted({round(float(o), 4) for o in (overlaps or settings_search.OVERLAPS)}, reverse=True)
    engines = installed(backend_name())
    grids = {name: settings_search.settings_grid([workspaces[i] for i in m], engines, wanted)
             for name, m in by_name.items()}
    sample = settings_search.sample_cases(workspaces[0], cases)
    results = settings_search.search(workspaces, by_name, grids, sample, lm,
                                     lambda p, r, sp: case_dice(p, r, sp, lm), progress)
    ranking, configuration = [], {}
    for (name, s), r in results.items():
        one = s if s.folds == 1 else dataclasses.replace(s, folds=1)
        label = f"{name} [{s.describe()}]"
        ranking.append(_candidate(label, plans[name], results[(name, one)]["dice"], lm, settings=s,
                                  seconds_per_case=round(float(np.mean(r["seconds"])), 3),
                                  dice_lower_bound=s.folds > 1))
        configuration[label] = name
    ranking.sort(key=lambda c: (-c.mean_foreground_dice, not c.dice_lower_bound, c.seconds_per_case))
    return ranking, sample, configuration


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
    settings = winner_settings(sel)
    if settings is not None and folds is None:
        folds = list(range(settings.folds))
    stages = [workspace_stage(ws, folds, tta, settings.inference() if settings else None) for ws in workspaces]
    post = sel.postprocessing if postprocessing else None
    note = (f"selection: {sel.winner} ({path}); postprocessing: "
            f"{', '.join(r.keep_largest for r in post.rules) or 'none' if post else 'off'}")
    return stages, post, note


def winner_settings(sel: Selection):
    """The prediction settings the selection chose with its winner (None: the plans' own)."""
    return next(c for c in sel.ranking if c.name == sel.winner).settings
