"""The trained folds as Keras models: each built from its frozen plan with the weights that
``inference.checkpoint`` names, and checked to agree with the others on preprocessing and labels."""
from __future__ import annotations

from pathlib import Path

from segplan.planner.plan import Plan
from segplan.runner.workspace import Fold, Workspace, weight_fields


def fold_weights(plan: Plan, fold: Fold) -> Path:
    """The weights file of a fold that ``inference.checkpoint`` names: the final weights (what the
    checkpoint pointer names once training has ended) or the best by the monitored loss."""
    if plan.inference.checkpoint == "best":
        if not fold.best.exists():
            raise FileNotFoundError(f"fold {fold.index}: inference.checkpoint is 'best' but {fold.best} does not exist")
        return fold.best
    return fold.latest_weights()


def selection_note(plan: Plan) -> str:
    """What, if anything, of a fold's training was decided on its validation cases: said beside its numbers."""
    if plan.training.schedule.monitor != "val_loss":
        return ""
    if plan.inference.checkpoint == "best":
        return ("the checkpoint was CHOSEN ON THESE VALIDATION CASES (inference.checkpoint: best, monitor: val_loss): "
                "the figures are optimistic, not a cross-validation estimate")
    return ("the learning-rate plateau and early stopping watched these validation cases (monitor: val_loss): "
            "slightly optimistic")


def build_models(plans: list[Plan], weights: list[Path], folds: list[int]) -> tuple[Plan, list]:
    """One Keras model per fold from its plan and weights file (Keras weights: nothing unpickled or
    executed); the plan to predict with, which the folds' preprocessing and labels must agree on."""
    from segplan.runner.training.model import plan_network, prediction_model
    models = []
    for k, plan, w in zip(folds, plans, weights):
        model = plan_network(plan)
        try:
            model.load_weights(str(w))
        except (OSError, ValueError) as e:  # not a weights file, or the weights of another network
            why = " ".join(str(e).split())  # Keras' message can hold whole tensors: its start says what
            raise ValueError(f"{w}: cannot be loaded as fold {k}'s weights into the network its plan describes "
                             f"({why[:300] + ' ...' if len(why) > 300 else why})") from e
        models.append(prediction_model(model))  # deep supervision's lower outputs trained, never predict
    first = {k: v for k, v in weight_fields(plans[0]).items() if not k.startswith("network.")}
    for k, p in zip(folds[1:], plans[1:]):
        if {a: b for a, b in weight_fields(p).items() if not a.startswith("network.")} != first:
            raise ValueError(f"fold {k} was trained with other preprocessing or labels than fold {folds[0]}: "
                             "predict with one of them (--folds)")
    return plans[0], models


def fold_weights_files(ws: Workspace, folds: list[int]) -> list[Path]:
    """The weights file each of ``folds`` predicts with (by its frozen plan's inference.checkpoint)."""
    return [fold_weights(ws.fold_plan(k), ws.fold(k)) for k in folds]


def load_fold_models(ws: Workspace, folds: list[int]) -> tuple[Plan, list]:
    """The folds' models, each built from the fold's frozen plan with the weights that
    ``inference.checkpoint`` names."""
    plans = [ws.fold_plan(k) for k in folds]
    return build_models(plans, [fold_weights(p, ws.fold(k)) for p, k in zip(plans, folds)], folds)
