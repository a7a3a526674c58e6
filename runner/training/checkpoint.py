"""Crash-safe checkpoints: weights + optimiser state files named by epoch, then a small JSON
pointer written last by atomic rename. A SIGKILL at any moment leaves the previous pointer and the
files it names intact; files of a half-written epoch are ignored and cleaned up next time."""
from __future__ import annotations

import json

import numpy as np

from segplan.planner.fileio import atomic, save_npz, write_json
from segplan.runner.training.schedule import TrainState
from segplan.runner.workspace import Fold


def save_latest(fold: Fold, model, state: TrainState) -> None:
    stem = f"ckpt_{state.epoch:05d}"
    weights, opt = fold.dir / f"{stem}.weights.h5", fold.dir / f"{stem}.opt.npz"
    with atomic(weights) as tmp:
        model.save_weights(str(tmp))
    save_npz(opt, **{f"v{i:04d}": np.asarray(v) for i, v in enumerate(model.optimizer.variables)})
    write_json(fold.pointer, {"weights": weights.name, "optimizer": opt.name, "state": state.to_dict()}, indent=1)
    for old in fold.dir.glob("ckpt_*"):
        if not old.name.startswith(stem):
            old.unlink(missing_ok=True)


def save_best(fold: Fold, model) -> None:
    with atomic(fold.best) as tmp:
        model.save_weights(str(tmp))


def load_latest(fold: Fold, model) -> TrainState | None:
    """Restore weights and optimiser state; None when there is no checkpoint."""
    if not fold.pointer.exists():
        return None
    meta = json.loads(fold.pointer.read_text())
    opt = model.optimizer
    opt.build(model.trainable_variables)
    model.load_weights(str(fold.dir / meta["weights"]))
    with np.load(fold.dir / meta["optimizer"], allow_pickle=False) as z:
        saved = [z[k] for k in sorted(z.files)]
    if len(saved) != len(opt.variables):
        raise ValueError(f"{fold.pointer}: optimiser state has {len(saved)} variables, the model needs {len(opt.variables)}")
    for var, val in zip(opt.variables, saved):
        var.assign(val)
    return TrainState.from_dict(meta["state"])
