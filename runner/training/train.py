"""train_fold: one fold of the plan, with exact resume. Training only: predicting the fold's
validation cases afterwards is segplan.runner.pipeline's job."""
from __future__ import annotations

import dataclasses
import math
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
from tqdm import tqdm

from segplan.planner.fileio import write_json
from segplan.planner.labels import label_model
from segplan.planner.plan import Plan, supervised_levels
from segplan.runner import backend
from segplan.runner.training.batches import batch_stream
from segplan.runner.cascade import previous_stage_maps
from segplan.runner.training.checkpoint import load_latest, save_best, save_latest
from segplan.runner.training.data import validation_batches
from segplan.runner.evaluation.plots import plot_progress
from segplan.runner.preprocessing.preprocess import preprocess_dataset
from segplan.runner.training.schedule import TrainState, after_epoch, budget_learning_rate, stop_reason
from segplan.runner.evaluation.tables import read_rows, write_rows
from segplan.runner.workspace import Fold, Workspace

BOOKKEEPING_RATIO = 100  # checkpoints and plots take at most ~1% of the training loop (_bookkeeping_due)
HISTORY_FIELDS = ["epoch", "train_loss", "train_dice", "val_loss", "val_dice", "learning_rate", "seconds",
                  "seconds_per_iteration"]


class FoldFinished(Exception):
    """Raised (and reported) when a fold is asked to train but has finished already."""


def compile_model(plan: Plan, learning_rate: float):
    """The plan's network with the plan's optimizer and loss; with deep supervision the loss of each
    supervised level, weighted as segplan.planner.plan.supervised_levels says (Keras sums them), and the
    Dice metric of the full-resolution output."""
    import keras
    from segplan.runner.training.losses import compile_arguments, plan_loss, soft_dice_metric
    from segplan.runner.training.model import plan_network
    keras.mixed_precision.set_global_policy(backend.mixed_policy() if plan.training.mixed_precision else "float32")
    keras.utils.set_random_seed(plan.training.seed)
    model = plan_network(plan)
    lm = label_model(plan)
    metric = soft_dice_metric(lm) if lm.has_regions or lm.has_ignore else fg_soft_dice
    model.compile(optimizer=make_optimizer(plan.training.optimizer, learning_rate),
                  **compile_arguments(plan.training.loss, supervised_levels(plan.network), metric,
                                      plan_loss(plan.training.loss, lm)))
    return model


def make_optimizer(name: str, learning_rate: float):
    """Adam (the paper's), or nnU-Net's SGD: Nesterov momentum 0.99, gradient norm clipped to 12."""
    import keras
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=0.99, nesterov=True, clipnorm=12.0)
    return keras.optimizers.Adam(learning_rate)


def load_initial_weights(model, path: Path) -> None:
    """A fine-tuning plan's starting weights (a bundle fold's) into a freshly compiled model: every
    layer whose shape matches (a new class count leaves the head new). The file also holds the
    bundle's optimiser state, left out on purpose (fine-tuning starts a fresh optimiser), so Keras'
    warning that it skips it says nothing the user needs and is silenced here alone."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        model.load_weights(str(path), skip_mismatch=True)


def _dice_of(out: dict) -> float:
    """The training Dice from train_on_batch's results (named after the output with several outputs)."""
    return float(next((v for k, v in out.items() if k.endswith("fg_soft_dice")), np.nan))


def fg_soft_dice(y_true, y_pred):
    """Mean soft Dice of the foreground classes (a training metric)."""
    from keras import ops
    y_true, y_pred = ops.cast(y_true, "float32")[..., 1:], ops.cast(y_pred, "float32")[..., 1:]
    axes = tuple(range(len(y_true.shape) - 1))  # batch and every spatial axis (2 or 3)
    inter = ops.sum(y_true * y_pred, axis=axes)
    denom = ops.sum(y_true, axis=axes) + ops.sum(y_pred, axis=axes)
    return ops.mean((2 * inter + 1e-6) / (denom + 1e-6))


def _validate(model, val_batches, plan: Plan) -> tuple[float, float]:
    """Loss (every supervised level, weighted) and hard Dice of the full-resolution output (of each
    region, on annotated voxels, as ``plan`` says), from one forward pass per batch (the loss is
    computed from its outputs, not by a second pass)."""
    from segplan.runner.training.losses import hard_dice
    if not val_batches:
        return float("nan"), float("nan")
    losses, probs, refs = [], [], []
    for x, y in val_batches:
        out = model.predict_on_batch(x)
        losses.append(float(model.compute_loss(x=x, y=y, y_pred=out, training=False)))
        probs.append(np.asarray(out[0] if isinstance(out, (list, tuple)) else out))
        refs.append(y[0] if isinstance(y, tuple) else y)
    dice = hard_dice(np.concatenate(refs), np.concatenate(probs), label_model(plan))
    return float(np.mean(losses)), float(np.nanmean(dice)) if np.any(~np.isnan(dice)) else float("nan")


def _start(ws: Workspace, k: int, resume: bool, restart: bool) -> Fold:
    """The fold's folder, after the checks that no work is lost or mixed up."""
    fold = ws.fold(k)
    if restart and fold.dir.exists():
        shutil.rmtree(fold.dir)
    if fold.is_finished() and not resume:
        raise FoldFinished(f"fold {k} has finished ({fold.dir}); pass --restart to train it again, or raise "
                           "max_epochs / time_budget_minutes in the plan and pass --resume to continue it")
    if fold.is_trained() and not resume:
        raise FileExistsError(f"fold {k} has a checkpoint in {fold.dir}; pass --resume to continue it "
                              "or --restart to start over")
    return fold


def train_fold(ws: Workspace, k: int, resume: bool = False, restart: bool = False, workers: int = 2,
               progress: bool = True, data_parallel: bool = False) -> Fold:
    """Train fold ``k`` of the workspace's plan; returns the fold. Its files: docs/training.md.
    ``data_parallel``: every local device trains on its share of each batch (runner/backend.py)."""
    fold = _start(ws, k, resume, restart)
    plan = ws.freeze(k)  # the fold's own plan: frozen network/preprocessing/labels, live schedule
    pre = preprocess_dataset(ws, workers=workers, progress=progress)
    previous = previous_stage_maps(ws, pre) if plan.configuration == "3d_cascade_fullres" else None
    split = ws.splits()[k]
    with backend.distributed(plan.training.batch_size, data_parallel, plan.training.schedule.validation_patches):
        return _train(ws, k, fold, plan, pre, split, resume, progress, previous)


def _train(ws: Workspace, k: int, fold: Fold, plan: Plan, pre, split: dict, resume: bool, progress: bool,
           previous=None) -> Fold:
    tr, sched = plan.training, plan.training.schedule
    # the model before the batch thread: its initial weights come from the global random state that
    # compile_model seeds and that the thread (seeded_global_numpy) swaps while it augments
    model = compile_model(plan, tr.learning_rate)
    state = load_latest(fold, model) if resume else None
    if state is None and tr.initial_weights:  # a fresh fold of a fine-tuning plan: start from those weights
        load_initial_weights(model, ws.base / tr.initial_weights)
    state = state or TrainState(learning_rate=tr.learning_rate)
    state = dataclasses.replace(state, stopped=stop_reason(state, sched))
    history = read_rows(fold.history)[: state.epoch]
    times = {}
    if not state.stopped:
        with batch_stream(pre, split["train"], plan, k, tr.workers, previous) as epoch_batches:
            val = validation_batches(pre, split["val"], plan, k, previous)
            state, times = _train_epochs(model, plan, fold, k, state, history, epoch_batches, val, progress)
    write_json(fold.finished, {"reason": state.stopped, "epochs": state.epoch, "best_epoch": state.best_epoch,
                               "training_seconds": round(state.elapsed_s, 1), **times})
    print(f"fold {k}: {state.stopped}; best epoch {state.best_epoch}; files in {fold.dir}")
    return fold


def _bookkeeping_due(since_s: float, cost_s: float) -> bool:
    """Checkpoint and plot again once the loop has run BOOKKEEPING_RATIO times what they last cost
    (at most 1/BOOKKEEPING_RATIO of the loop's time; on a GPU, whose epochs are long, every epoch)."""
    return since_s >= BOOKKEEPING_RATIO * cost_s


def _train_epochs(model, plan: Plan, fold: Fold, k: int, state: TrainState, history: list[dict], epoch_batches,
                  val, progress: bool) -> TrainState:
    """Epochs until the schedule says stop. After each: the history row; the validation patches every
    ``validation_every`` epochs (and after the last); the plot and the checkpoint (best weights, then
    the pointer last) when due and at the end, so that bookkeeping stays a small share of the loop."""
    tr, sched = plan.training, plan.training.schedule
    writer = backend.metrics_writer(fold.tensorboard)
    budget_s = sched.time_budget_minutes * 60 if sched.time_budget_minutes is not None else math.inf
    loop_t0 = time.perf_counter()
    step_s, since_s, cost_s, best_weights = 0.0, 0.0, 0.0, None
    val_s = book_s = wait_s = 0.0  # seconds spent validating, checkpointing + plotting, waiting for batches
    while not state.stopped:
        lr = (budget_learning_rate(tr.learning_rate, sched.min_learning_rate, state.elapsed_s, sched.time_budget_minutes)
              if sched.time_budget_minutes is not None else state.learning_rate)
        model.optimizer.learning_rate.assign(lr)
        t0 = time.perf_counter()
        losses, dices = [], []
        bar = tqdm(epoch_batches(state.epoch, sched.iterations_per_epoch),
                   total=sched.iterations_per_epoch, desc=f"fold {k} epoch {state.epoch}", disable=not progress,
                   dynamic_ncols=True, leave=False)
        tw = time.perf_counter()
        for x, y in bar:
            ts = time.perf_counter()
            wait_s += ts - tw
            out = model.train_on_batch(x, y, return_dict=True)
            losses.append(float(out["loss"]))
            step_s += time.perf_counter() - ts
            dices.append(_dice_of(out))
            it_s = (time.perf_counter() - t0) / len(losses)
            bar.set_postfix(loss=f"{np.mean(losses):.4f}", dice=f"{np.nanmean(dices):.3f}", lr=f"{lr:.2e}",
                            s_it=f"{it_s:.2f}")
            if state.elapsed_s + time.perf_counter() - t0 >= budget_s:
                break
            tw = time.perf_counter()
        bar.close()
        train_s = time.perf_counter() - t0
        validated = state.epoch % sched.validation_every == 0
        tv = time.perf_counter()
        val_loss, val_dice = _validate(model, val, plan) if validated else (float("nan"), float("nan"))
        state = dataclasses.replace(state, learning_rate=lr, elapsed_s=state.elapsed_s + train_s)
        monitored = val_loss if sched.monitor == "val_loss" and not math.isnan(val_loss) else float(np.mean(losses))
        state, improved = after_epoch(state, monitored, sched)
        if state.stopped and not validated:  # the last epoch is always validated
            val_loss, val_dice = _validate(model, val, plan)
        val_s += time.perf_counter() - tv
        row = {"epoch": state.epoch - 1, "train_loss": float(np.mean(losses)), "train_dice": float(np.nanmean(dices)),
               "val_loss": val_loss, "val_dice": val_dice, "learning_rate": lr,
               "seconds": round(time.perf_counter() - t0, 2), "seconds_per_iteration": round(train_s / max(len(losses), 1), 3)}
        history.append(row)
        if improved:
            best_weights = model.get_weights()
        # history first, checkpoint pointer last: a kill in between leaves rows that resume drops
        write_rows(history, fold.history, HISTORY_FIELDS)
        backend.log_scalars(writer, row)
        since_s += time.perf_counter() - t0
        if state.stopped or _bookkeeping_due(since_s, cost_s):
            tb = time.perf_counter()
            if best_weights is not None:
                _save_best_weights(fold, model, best_weights)
                best_weights = None
            plot_progress(history, fold.progress)
            save_latest(fold, model, state)
            since_s, cost_s = 0.0, time.perf_counter() - tb
            book_s += cost_s
        print(f"fold {k} epoch {row['epoch']}: loss {row['train_loss']:.4f}, val loss {val_loss:.4f}, "
                  f"val Dice {val_dice:.3f}, lr {lr:.2e}, {row['seconds_per_iteration']:.2f} s/it"
                  + (" *best*" if improved else ""), flush=True)
    loop_s = time.perf_counter() - loop_t0
    return state, {"loop_seconds": round(loop_s, 1), "step_seconds": round(step_s, 1),
                   "outside_steps_share": round(1 - step_s / loop_s, 4) if loop_s else 0.0,
                   "validation_seconds": round(val_s, 1), "bookkeeping_seconds": round(book_s, 1),
                   "batch_wait_seconds": round(wait_s, 1)}


def _save_best_weights(fold: Fold, model, weights: list) -> None:
    """Write ``weights`` (the best epoch's, kept in memory since) as the best checkpoint, leaving the
    model's current weights as they were."""
    current = model.get_weights()
    model.set_weights(weights)
    try:
        save_best(fold, model)
    finally:
        model.set_weights(current)
