"""Multi-class Tversky + categorical cross-entropy (per supervised level with deep supervision), and
a soft Dice metric (channels-last, one-hot targets; 2 or 3 spatial axes)."""
from __future__ import annotations

import keras
from keras import ops

from planner.plan import LossSection, SupervisedLevel


def spatial_axes(y) -> tuple[int, ...]:
    """The spatial axes of a channels-last (batch, ..., classes) tensor: 2 or 3 of them, whichever the plan's."""
    return tuple(range(1, len(y.shape) - 1))


def tversky_index(y_true, y_pred, alpha: float, beta: float, smooth: float):
    """Per sample and class: TP / (TP + alpha FN + beta FP), summed over voxels (shape (batch, classes))."""
    axes = spatial_axes(y_true)
    tp = ops.sum(y_true * y_pred, axis=axes)
    fn = ops.sum(y_true * (1.0 - y_pred), axis=axes)
    fp = ops.sum((1.0 - y_true) * y_pred, axis=axes)
    return (tp + smooth) / (tp + alpha * fn + beta * fp + smooth)


def tversky_loss(y_true, y_pred, alpha: float = 0.5, beta: float = 0.5, smooth: float = 1e-6):
    """n_classes - sum_c TI_c, averaged over the batch (MIScnn's form, background included)."""
    ti = tversky_index(y_true, y_pred, alpha, beta, smooth)
    return ops.mean(ops.cast(ops.shape(ti)[-1], ti.dtype) - ops.sum(ti, axis=-1))


def soft_dice_loss(y_true, y_pred, smooth: float = 1e-6):
    """n_classes - sum_c 2 TP / (2 TP + FN + FP): what Tversky with alpha = beta = 0.5 must equal."""
    axes = spatial_axes(y_true)
    inter = ops.sum(y_true * y_pred, axis=axes)
    denom = ops.sum(y_true, axis=axes) + ops.sum(y_pred, axis=axes)
    dice = (2.0 * inter + 2.0 * smooth) / (denom + 2.0 * smooth)
    return ops.mean(ops.cast(ops.shape(dice)[-1], dice.dtype) - ops.sum(dice, axis=-1))


def make_loss(cfg: LossSection):
    """The plan's loss: tversky_weight * Tversky + cross_entropy_weight * mean CCE."""
    def loss(y_true, y_pred):
        y_pred = ops.cast(y_pred, "float32")
        y_true = ops.cast(y_true, "float32")
        tv = tversky_loss(y_true, y_pred, cfg.tversky_alpha, cfg.tversky_beta, cfg.smooth)
        ce = ops.mean(keras.losses.categorical_crossentropy(y_true, ops.clip(y_pred, 1e-7, 1.0)))
        return cfg.tversky_weight * tv + cfg.cross_entropy_weight * ce
    return loss


def compile_arguments(cfg: LossSection, levels: list[SupervisedLevel], metric=None) -> dict:
    """Keras ``compile`` arguments: the plan's loss on each supervised level (planner.plan.
    supervised_levels), weighted by its level weight (Keras sums them), and ``metric`` on the
    full-resolution output only."""
    loss = make_loss(cfg)
    if len(levels) == 1:
        return {"loss": loss, "metrics": [metric] if metric else None}
    return {"loss": [loss] * len(levels), "loss_weights": [lv.weight for lv in levels],
            "metrics": [[metric] if metric else []] + [[] for _ in levels[1:]]}


def hard_dice_per_class(y_true, y_pred):
    """Dice of the arg-max prediction per class over the batch (numpy in, numpy out); NaN where absent."""
    import numpy as np
    k = y_pred.shape[-1]
    pred = np.argmax(y_pred, -1)
    ref = np.argmax(y_true, -1)
    out = []
    for c in range(1, k):
        p, r = pred == c, ref == c
        denom = p.sum() + r.sum()
        out.append(2.0 * np.logical_and(p, r).sum() / denom if denom else np.nan)
    return np.array(out)
