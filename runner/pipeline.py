"""Orchestration: a fold is trained, then its validation cases are predicted and evaluated. The
steps (train.py, predict.py, evaluate.py) know nothing of each other; this module strings them."""
from __future__ import annotations

from pathlib import Path

from segplan.planner.dataset import Case
from segplan.planner.fileio import data_files, renamed, split_ending, write_text
from segplan.planner.labels import label_model
from segplan.runner.evaluation.evaluate import evaluate_folder
from segplan.runner.locks import hold
from segplan.runner.evaluation.oof import missing_probabilities
from segplan.runner.inference.models import fold_weights_files, load_fold_models, selection_note
from segplan.runner.inference.predict import predict_cases
from segplan.runner.training.train import FoldFinished, train_fold
from segplan.runner.trust.fit import lacking
from segplan.runner.workspace import Workspace


def predict_validation(ws: Workspace, k: int, progress: bool = True, redo: bool = True) -> str:
    """Predict fold k's validation cases into its validation/ folder (label maps and out-of-fold
    probabilities, runner/evaluation/oof.py) and evaluate them there. ``redo`` False: only the cases whose
    probabilities (written last) are missing, as after an interrupted validation of the same weights.
    A cascade's cases take fold k's out-of-fold predictions of its previous stage as extra input."""
    fold = ws.fold(k)
    val_ids = set(ws.splits()[k]["val"])
    cases = [c for c in ws.dataset.cases if c.case_id in val_ids]
    todo = [c for c in cases if redo or not fold.validation_probabilities(c.case_id).exists()]
    previous = None
    if ws.plan.configuration == "3d_cascade_fullres":
        from segplan.runner.cascade import check_previous_stage, out_of_fold_labels
        previous = out_of_fold_labels(check_previous_stage(ws), k)
    if todo:
        plan, models = load_fold_models(ws, [k])
        predict_cases([Case(c.case_id, c.image_files, None) for c in todo], plan, models, fold.validation, True,
                      True, progress, training_cases=True,  # read in the units the plan gives them, as in training
                      previous=previous, weights=fold_weights_files(ws, [k]), folds=[k])
    plan = ws.fold_plan(k)
    link_references(cases, fold.validation_reference)
    notes = {"checkpoint": plan.inference.checkpoint, "monitor": plan.training.schedule.monitor,
             "selection_note": selection_note(plan)}
    summary = evaluate_folder(fold.validation, fold.validation_reference, lm=label_model(plan), notes=notes)
    print(f"fold {k} validation ({len(cases)} cases):\n{summary}")
    return summary


def link_references(cases: list[Case], folder: Path) -> None:
    """Link each case's reference label map into ``folder`` as ``<case><its own ending>``, so
    `segplan evaluate` (and postprocessing) can re-read the folder: an NRRD reference stays .nrrd, as
    SimpleITK chooses the reader by the file name; a MetaImage header's data file is linked beside it.
    Links of these cases under other names (an older run's) are removed, so each case has one reference."""
    folder.mkdir(parents=True, exist_ok=True)
    names = {c.case_id: renamed(c.label_file, c.case_id) for c in cases}
    for p in folder.iterdir():
        parts = split_ending(p.name)
        if parts and parts[0] in names and p.name != names[parts[0]] and p.is_symlink():
            p.unlink()
    for c in cases:
        target = Path(c.label_file).resolve()
        _link(folder / names[c.case_id], target)
        for name in data_files(target):  # a MetaImage header's voxels, under the name it gives them
            _link(folder / name, target.parent / name)


def _link(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(target)


def run_fold(ws: Workspace, k: int, resume: bool = False, restart: bool = False, workers: int = 2,
             progress: bool = True, data_parallel: bool = False) -> None:
    """`segplan run`: train fold k (unless finished), then predict and evaluate its validation cases.

    The fold is locked while this runs (a second run of it, on any node sharing the work folder,
    refuses with the holder's host and pid); an error is kept in the fold's failed.txt for
    `segplan status` and removed by the next run that succeeds."""
    fold = ws.fold(k)
    if ws.plan.configuration == "3d_cascade_fullres":  # refused before any work, naming what to run first
        from segplan.runner.cascade import check_previous_stage
        check_previous_stage(ws)
    with hold(fold.lock, f"fold {k} of {ws.plan.name}"):
        try:
            trained = True
            try:
                train_fold(ws, k, resume=resume, restart=restart, workers=workers, progress=progress,
                           data_parallel=data_parallel)
            except FoldFinished as e:
                print(f"segplan: {e}")
                trained = False
            older = fold.validation_summary.exists() and bool(lacking(ws, k))
            if trained or older or not fold.validation_summary.exists() or missing_probabilities(ws, k):
                predict_validation(ws, k, progress, redo=trained or older)   # older: validated before QC features
        except BaseException as e:
            if fold.dir.exists() and not isinstance(e, (KeyboardInterrupt, SystemExit)):
                write_text(fold.failed, f"{type(e).__name__}: {e}".splitlines()[0] + "\n")
            raise
        fold.failed.unlink(missing_ok=True)
