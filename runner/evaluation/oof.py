"""Out-of-fold predictions: each case of a plan's dataset predicted by the one fold that held it out,
as a label map and as probabilities (softmax, or a region plan's sigmoids) on the case's original grid (float16 ``<case>.npz`` in
the fold's validation/ folder, nnU-Net's ``--npz``), written by every `segplan run` after training.

`segplan select` ranks and ensembles configurations on them and a cascade trains on its previous
stage's; both need every fold of a plan finished with all of them, and plans that are compared or
chained must share the split (else a case would be "out of fold" for one plan and not the other).
Those two checks live here and refuse by name: which plan, which fold, and what to run."""
from __future__ import annotations

import numpy as np

from segplan.planner.labels import label_model
from segplan.runner.workspace import Workspace


class NotFinished(ValueError):
    """A plan whose folds have not all finished with their out-of-fold predictions."""


def missing_probabilities(ws: Workspace, k: int) -> list[str]:
    """Fold ``k``'s validation cases whose probabilities are not (completely) written."""
    fold = ws.fold(k)
    return [cid for cid in ws.splits()[k]["val"] if not fold.validation_probabilities(cid).exists()]


def unfinished(ws: Workspace) -> dict[int, str]:
    """Per fold not ready for out-of-fold use, why."""
    why = {}
    for fold in ws.folds():
        if not fold.is_trained():
            why[fold.index] = "has not been trained"
        elif not fold.is_finished():
            why[fold.index] = "has not finished training"
    if why:  # the split may not exist yet; finished folds do have one
        return why
    for fold in ws.folds():
        missing = missing_probabilities(ws, fold.index)
        if missing:
            why[fold.index] = (f"has no out-of-fold probabilities for {len(missing)} of its validation cases "
                               f"(e.g. {missing[0]}; folds validated before segplan saved them, or a validation "
                               "that was interrupted)")
    return why


def require_finished(ws: Workspace, who: str) -> None:
    """Refuse, naming the plan, each fold and the command that finishes it, unless every fold of
    ``ws`` has finished with its out-of-fold probabilities (``who``: what needs them)."""
    why = unfinished(ws)
    if why:
        todo = "; ".join(f"fold {k} {reason}: run `segplan run {ws.plan_path} --fold {k}`" for k, reason in why.items())
        raise NotFinished(f"{who} needs every fold of {ws.plan_path} finished with its out-of-fold predictions: {todo}")


def require_same_split(workspaces: list[Workspace]) -> None:
    """Refuse plans whose cross-validation splits differ, naming both plans and the first fold that
    differs (the number of folds, or the cases it validates)."""
    first = workspaces[0]
    a = first.splits()
    for ws in workspaces[1:]:
        b = ws.splits()
        where = f"{first.plan_path} and {ws.plan_path} have different cross-validation splits"
        fix = ("give them the same cross_validation (folds, seed) and dataset (or dataset.splits_file); a split "
               f"is written once, so also delete the wrong one of {first.splits_file} and {ws.splits_file}, then train "
               "that plan's folds again")
        if len(a) != len(b):
            raise ValueError(f"{where}: {len(a)} folds and {len(b)}; {fix}")
        for k, (fa, fb) in enumerate(zip(a, b)):
            va, vb = set(fa["val"]), set(fb["val"])
            if va != vb:
                only_a, only_b = sorted(va - vb), sorted(vb - va)
                raise ValueError(f"{where}: fold {k} validates {', '.join(only_a[:3]) or 'nothing'} in the first and "
                                 f"{', '.join(only_b[:3]) or 'nothing'} in the second instead; {fix}")


def load_probabilities(ws: Workspace, k: int, case_id: str) -> np.ndarray:
    """A case's out-of-fold probabilities (outputs, z, y, x) as stored (float16): one softmax channel
    per label, or one sigmoid per region of a region plan."""
    path = ws.fold(k).validation_probabilities(case_id)
    with np.load(path, allow_pickle=False) as z:
        probs = z["probabilities"]
    lm = label_model(ws.plan)
    if probs.ndim < 2 or probs.shape[0] != lm.n_outputs:
        raise ValueError(f"{path}: probabilities of shape {probs.shape}; the plan's network has {lm.n_outputs} "
                         f"outputs ({lm.activation}: {', '.join(lm.outputs)}) on the first axis")
    return probs
