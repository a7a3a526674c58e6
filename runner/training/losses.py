"""Multi-class Tversky + categorical cross-entropy (per supervised level with deep supervision), and
a soft Dice metric (channels-last, one-hot targets; 2 or 3 spatial axes).

A region plan (dataset.regions) trains its sigmoid outputs with Tversky per region + binary
cross-entropy (``make_region_loss``; nnU-Net's DC_and_BCE_loss with Tversky for its soft Dice).
With an ignore label the target's last channel is the annotated mask (runner/training/targets.py): both
terms then see annotated voxels only (the Tversky sums and the cross-entropy's mean), so an
unannotated voxel adds nothing to the loss and receives no gradient (``plan_loss`` picks).
"""
from __future__ import annotations

import keras
from keras import ops

from segplan.planner.labels import LabelModel
from segplan.planner.plan import LossSection, SupervisedLevel


def spatial_axes(y) -> tuple[int, ...]:
    """The spatial axes of a channels-last (batch, ..., classes) tensor: 2 or 3 of them, whichever the plan's."""
    return tuple(range(1, len(y.shape) - 1))


def tversky_index(y_true, y_pred, alpha: float, beta: float, smooth: float, mask=None, batch: bool = False):
    """Per sample and class: TP / (TP + alpha FN + beta FP), summed over voxels (shape (batch, classes));
    ``batch``: summed over the batch's voxels as one volume (shape (classes,)); ``mask`` (b, *spatial,
    1): only its voxels are summed."""
    if mask is not None:
        y_true, y_pred = y_true * mask, y_pred * mask
    axes = (0,) * batch + spatial_axes(y_true)
    tp = ops.sum(y_true * y_pred, axis=axes)
    fn = ops.sum(y_true * (1.0 - y_pred), axis=axes)
    fp = ops.sum((1.0 - y_true) * y_pred, axis=axes)
    return (tp + smooth) / (tp + alpha * fn + beta * fp + smooth)


def tversky_loss(y_true, y_pred, alpha: float = 0.5, beta: float = 0.5, smooth: float = 1e-6, mask=None,
                 batch: bool = False):
    """n_classes - sum_c TI_c, averaged over the batch (MIScnn's form, background included); ``batch``:
    one index per class over the whole batch (nnU-Net's batch_dice)."""
    ti = tversky_index(y_true, y_pred, alpha, beta, smooth, mask, batch)
    return ops.mean(ops.cast(ops.shape(ti)[-1], ti.dtype) - ops.sum(ti, axis=-1))


def soft_dice_loss(y_true, y_pred, smooth: float = 1e-6):
    """n_classes - sum_c 2 TP / (2 TP + FN + FP): what Tversky with alpha = beta = 0.5 must equal."""
    axes = spatial_axes(y_true)
    inter = ops.sum(y_true * y_pred, axis=axes)
    denom = ops.sum(y_true, axis=axes) + ops.sum(y_pred, axis=axes)
    dice = (2.0 * inter + 2.0 * smooth) / (denom + 2.0 * smooth)
    return ops.mean(ops.cast(ops.shape(dice)[-1], dice.dtype) - ops.sum(dice, axis=-1))


def _split(y_true, ignore: bool):
    """(target, annotated mask (b, z, y, x, 1) or None): with an ignore label the mask is the last channel."""
    return (y_true[..., :-1], y_true[..., -1:]) if ignore else (y_true, None)


def _mean(values, mask):
    """The mean of per-voxel ``values`` (b, z, y, x), over the annotated voxels where ``mask`` is given."""
    if mask is None:
        return ops.mean(values)
    m = mask[..., 0]
    return ops.sum(values * m) / ops.maximum(ops.sum(m), 1.0)


def make_loss(cfg: LossSection):
    """A softmax plan's loss without an ignore label (``plan_loss`` gives every plan's)."""
    return _softmax_loss(cfg, False)


def _softmax_loss(cfg: LossSection, ignore: bool):
    """tversky_weight * Tversky (per patch, or over the batch with batch_dice) + cross_entropy_weight *
    mean CCE (``ignore``: over the annotated voxels, the target's last channel)."""
    def loss(y_true, y_pred):
        y_pred = ops.cast(y_pred, "float32")
        y_true, mask = _split(ops.cast(y_true, "float32"), ignore)
        tv = tversky_loss(y_true, y_pred, cfg.tversky_alpha, cfg.tversky_beta, cfg.smooth, mask, cfg.batch_dice)
        ce = _mean(keras.losses.categorical_crossentropy(y_true, ops.clip(y_pred, 1e-7, 1.0)), mask)
        return cfg.tversky_weight * tv + cfg.cross_entropy_weight * ce
    return loss


def _region_loss(cfg: LossSection, ignore: bool):
    """A region plan's loss: tversky_weight * (n_regions - sum_r TI_r, per sample, averaged over the
    batch) + cross_entropy_weight * binary cross-entropy averaged over regions and voxels (``ignore``:
    the annotated voxels, the target's last channel). The regions may overlap: each is its own
    sigmoid, nothing makes them exclusive."""
    eps = 1e-7

    def loss(y_true, y_pred):
        y_pred = ops.cast(y_pred, "float32")
        y_true, mask = _split(ops.cast(y_true, "float32"), ignore)
        tv = tversky_loss(y_true, y_pred, cfg.tversky_alpha, cfg.tversky_beta, cfg.smooth, mask, cfg.batch_dice)
        p = ops.clip(y_pred, eps, 1.0 - eps)
        bce = -ops.mean(y_true * ops.log(p) + (1.0 - y_true) * ops.log(1.0 - p), axis=-1)
        return cfg.tversky_weight * tv + cfg.cross_entropy_weight * _mean(bce, mask)
    return loss


def plan_loss(cfg: LossSection, lm: LabelModel):
    """The loss a plan trains with: softmax Tversky + CCE, or for a region plan Tversky + BCE per
    region; with an ignore label, on annotated voxels only."""
    return _region_loss(cfg, lm.has_ignore) if lm.has_regions else _softmax_loss(cfg, lm.has_ignore)


def soft_dice_metric(lm: LabelModel):
    """The training Dice metric, named as the plain one (train.fg_soft_dice): mean soft Dice of the
    foreground channels (every region; the labels but background), over the annotated voxels."""
    first, ignore = (0 if lm.has_regions else 1), lm.has_ignore

    def fg_soft_dice(y_true, y_pred):
        y_true, mask = _split(ops.cast(y_true, "float32"), ignore)
        y_true, y_pred = y_true[..., first:], ops.cast(y_pred, "float32")[..., first:]
        if mask is not None:
            y_true, y_pred = y_true * mask, y_pred * mask
        axes = tuple(range(len(y_true.shape) - 1))  # batch and every spatial axis (2 or 3)
        inter = ops.sum(y_true * y_pred, axis=axes)
        denom = ops.sum(y_true, axis=axes) + ops.sum(y_pred, axis=axes)
        return ops.mean((2 * inter + 1e-6) / (denom + 1e-6))
    return fg_soft_dice


def compile_arguments(cfg: LossSection, levels: list[SupervisedLevel], metric=None, loss=None) -> dict:
    """Keras ``compile`` arguments: the plan's loss (``loss``, by default ``make_loss(cfg)``) on each
    supervised level (segplan.planner.plan.supervised_levels), weighted by its level weight (Keras sums
    them), and ``metric`` on the full-resolution output only."""
    loss = loss or make_loss(cfg)
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


def hard_dice(y_true, y_pred, lm: LabelModel):
    """Dice per foreground output over the batch (numpy; NaN where absent): of each region thresholded
    at 0.5 for a region plan, else of the arg-max labels but background; annotated voxels only."""
    import numpy as np
    regions, ignore = lm.has_regions, lm.has_ignore
    if not regions and not ignore:
        return hard_dice_per_class(y_true, y_pred)
    mask = y_true[..., -1] > 0.5 if ignore else np.ones(y_true.shape[:-1], bool)
    ref = (y_true[..., :-1] if ignore else y_true) > 0.5
    k = y_pred.shape[-1]
    pred = y_pred > 0.5 if regions else np.eye(k, dtype=bool)[np.argmax(y_pred, -1)]
    out = []
    for c in range(0 if regions else 1, k):
        p, r = pred[..., c] & mask, ref[..., c] & mask
        denom = p.sum() + r.sum()
        out.append(2.0 * np.logical_and(p, r).sum() / denom if denom else np.nan)
    return np.array(out)
