"""train_fold / run_fold: one fold of the plan, with exact resume, then prediction of its validation cases."""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from planner.dataset import atomic_write_text, load_dataset
from planner.plan import Plan, load_plan
from runner.preprocess import preprocess_dataset
from runner.schedule import TrainState, after_epoch, budget_learning_rate, stop_reason
from runner.splits import load_or_make_splits
from runner.tables import read_rows, write_rows

HISTORY_FIELDS = ["epoch", "train_loss", "train_dice", "val_loss", "val_dice", "learning_rate", "seconds",
                  "seconds_per_iteration"]


class FoldFinished(Exception):
    """Raised (and reported) when a fold is asked to train but has finished already."""


def fold_splits(plan: Plan, base: Path) -> list[dict]:
    ds = load_dataset(base / plan.dataset.path)
    given = base / plan.dataset.splits_file if plan.dataset.splits_file else None
    return load_or_make_splits(base / plan.dataset.work_dir, [c.case_id for c in ds.cases],
                               plan.cross_validation.folds, plan.cross_validation.seed, given)


def compile_model(plan: Plan, learning_rate: float):
    import keras
    from runner.losses import make_loss
    from runner.model import build_unet
    if plan.training.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_bfloat16" if not _has_gpu() else "mixed_float16")
    keras.utils.set_random_seed(plan.training.seed)
    model = build_unet(plan.network, len(plan.dataset.channels), len(plan.dataset.labels))
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=make_loss(plan.training.loss),
                  metrics=[fg_soft_dice])
    return model


def fg_soft_dice(y_true, y_pred):
    """Mean soft Dice of the foreground classes (a training metric)."""
    from keras import ops
    y_true, y_pred = ops.cast(y_true, "float32")[..., 1:], ops.cast(y_pred, "float32")[..., 1:]
    inter = ops.sum(y_true * y_pred, axis=(0, 1, 2, 3))
    denom = ops.sum(y_true, axis=(0, 1, 2, 3)) + ops.sum(y_pred, axis=(0, 1, 2, 3))
    return ops.mean((2 * inter + 1e-6) / (denom + 1e-6))


def _has_gpu() -> bool:
    import tensorflow as tf
    return bool(tf.config.list_physical_devices("GPU"))


def _strategy():
    import tensorflow as tf
    gpus = tf.config.list_physical_devices("GPU")
    return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()


def _validate(model, val_batches, n_classes: int) -> tuple[float, float]:
    from runner.losses import hard_dice_per_class
    if not val_batches:
        return float("nan"), float("nan")
    losses, probs, refs = [], [], []
    for x, y in val_batches:
        out = model.test_on_batch(x, y, return_dict=True)
        losses.append(out["loss"])
        probs.append(np.asarray(model.predict_on_batch(x)))
        refs.append(y)
    dice = hard_dice_per_class(np.concatenate(refs), np.concatenate(probs))
    return float(np.mean(losses)), float(np.nanmean(dice)) if np.any(~np.isnan(dice)) else float("nan")


def train_fold(plan_path: Path, fold: int, resume: bool = False, restart: bool = False, workers: int = 2,
               progress: bool = True) -> Path:
    """Train fold ``fold``; returns the fold folder. See the README for the files it writes."""
    plan_path = Path(plan_path)
    plan = load_plan(plan_path)
    base = plan_path.parent
    work = base / plan.dataset.work_dir
    fold_dir = work / f"fold_{fold}"
    pointer = fold_dir / "checkpoint_latest.json"
    if restart and fold_dir.exists():
        shutil.rmtree(fold_dir)
    if (fold_dir / "finished.json").exists():
        raise FoldFinished(f"fold {fold} has finished ({fold_dir}); pass --restart to train it again")
    if pointer.exists() and not resume:
        raise FileExistsError(f"fold {fold} has a checkpoint in {fold_dir}; pass --resume to continue it "
                              "or --restart to start over")
    pre = preprocess_dataset(plan, base, workers=workers, progress=progress)
    split = fold_splits(plan, base)[fold]
    fold_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(plan_path, fold_dir / "plan.yaml")  # frozen copy: all that prediction needs

    from runner.checkpoint import load_latest, save_best, save_latest
    from runner.data import PatchSampler, build_augmentation, prefetch, validation_batches
    from runner.plots import plot_progress
    tr, sched = plan.training, plan.training.schedule
    with _strategy().scope():
        model = compile_model(plan, tr.learning_rate)
    state = load_latest(fold_dir, model) if resume else None
    state = state or TrainState(learning_rate=tr.learning_rate)
    state = dataclasses.replace(state, stopped=stop_reason(state, sched))
    history = read_rows(fold_dir / "history.csv")[: state.epoch]
    sampler = PatchSampler(pre, split["train"], tr.patch_size, tr.sampling.foreground_oversampling)
    augment = build_augmentation(tr.augmentation, tr.patch_size)
    val = validation_batches(pre, split["val"], plan, fold)
    writer = _tensorboard(fold_dir / "tensorboard")
    n_cls = len(plan.dataset.labels)
    budget_s = sched.time_budget_minutes * 60 if sched.time_budget_minutes is not None else math.inf
    while not state.stopped:
        lr = (budget_learning_rate(tr.learning_rate, sched.min_learning_rate, state.elapsed_s, sched.time_budget_minutes)
              if sched.time_budget_minutes is not None else state.learning_rate)
        model.optimizer.learning_rate.assign(lr)
        t0 = time.perf_counter()
        losses, dices = [], []
        bar = tqdm(prefetch(sampler, augment, plan, fold, state.epoch, sched.iterations_per_epoch),
                   total=sched.iterations_per_epoch, desc=f"fold {fold} epoch {state.epoch}", disable=not progress,
                   dynamic_ncols=True, leave=False)
        for x, y in bar:
            out = model.train_on_batch(x, y, return_dict=True)
            losses.append(float(out["loss"]))
            dices.append(float(out.get("fg_soft_dice", np.nan)))
            it_s = (time.perf_counter() - t0) / len(losses)
            bar.set_postfix(loss=f"{np.mean(losses):.4f}", dice=f"{np.nanmean(dices):.3f}", lr=f"{lr:.2e}",
                            s_it=f"{it_s:.2f}")
            if state.elapsed_s + time.perf_counter() - t0 >= budget_s:
                break
        bar.close()
        train_s = time.perf_counter() - t0
        val_loss, val_dice = _validate(model, val, n_cls)
        state = dataclasses.replace(state, learning_rate=lr, elapsed_s=state.elapsed_s + train_s)
        monitored = val_loss if sched.monitor == "val_loss" and not math.isnan(val_loss) else float(np.mean(losses))
        state, improved = after_epoch(state, monitored, sched)
        row = {"epoch": state.epoch - 1, "train_loss": float(np.mean(losses)), "train_dice": float(np.nanmean(dices)),
               "val_loss": val_loss, "val_dice": val_dice, "learning_rate": lr,
               "seconds": round(time.perf_counter() - t0, 2), "seconds_per_iteration": round(train_s / max(len(losses), 1), 3)}
        history.append(row)
        if improved:
            save_best(fold_dir, model)
        # history first, checkpoint pointer last: a kill in between leaves a row that resume drops
        write_rows(history, fold_dir / "history.csv", HISTORY_FIELDS)
        plot_progress(history, fold_dir / "progress.png")
        save_latest(fold_dir, model, state)
        _log_tensorboard(writer, row)
        if progress:
            print(f"fold {fold} epoch {row['epoch']}: loss {row['train_loss']:.4f}, val loss {val_loss:.4f}, "
                  f"val Dice {val_dice:.3f}, lr {lr:.2e}, {row['seconds_per_iteration']:.2f} s/it"
                  + (" *best*" if improved else ""))
    atomic_write_text(fold_dir / "finished.json", json.dumps({"reason": state.stopped, "epochs": state.epoch,
                                                              "best_epoch": state.best_epoch,
                                                              "training_seconds": round(state.elapsed_s, 1)}))
    print(f"fold {fold}: {state.stopped}; best epoch {state.best_epoch}; files in {fold_dir}")
    return fold_dir


def _tensorboard(path: Path):
    import tensorflow as tf
    return tf.summary.create_file_writer(str(path))


def _log_tensorboard(writer, row: dict) -> None:
    import tensorflow as tf
    with writer.as_default():
        for k, v in row.items():
            if k != "epoch" and not (isinstance(v, float) and math.isnan(v)):
                tf.summary.scalar(k, v, step=row["epoch"])
    writer.flush()


def run_fold(plan_path: Path, fold: int, resume: bool = False, restart: bool = False, workers: int = 2) -> None:
    """`segplan run`: train (unless finished), then predict and evaluate the validation cases."""
    try:
        fold_dir = train_fold(plan_path, fold, resume=resume, restart=restart, workers=workers)
    except FoldFinished as e:
        print(f"segplan: {e}")
        fold_dir = None
    from runner.predict import predict_validation
    plan = load_plan(plan_path)
    fd = fold_dir or Path(plan_path).parent / plan.dataset.work_dir / f"fold_{fold}"
    if fold_dir is not None or not (fd / "validation" / "summary.yaml").exists():
        predict_validation(Path(plan_path), fold)
