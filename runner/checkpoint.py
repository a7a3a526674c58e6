"""Crash-safe checkpoints: weights + optimiser state files named by epoch, then a small JSON
pointer written last by atomic rename. A SIGKILL at any moment leaves the previous pointer and the
files it names intact; files of a half-written epoch are ignored and cleaned up next time."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from planner.dataset import atomic_write_text
from runner.schedule import TrainState

POINTER = "checkpoint_latest.json"
BEST = "checkpoint_best.weights.h5"


def save_latest(fold_dir: Path, model, state: TrainState) -> None:
    fold_dir = Path(fold_dir)
    stem = f"ckpt_{state.epoch:05d}"
    weights, opt = fold_dir / f"{stem}.weights.h5", fold_dir / f"{stem}.opt.npz"
    model.save_weights(str(weights))
    values = {f"v{i:04d}": np.asarray(v) for i, v in enumerate(model.optimizer.variables)}
    tmp = fold_dir / f".tmp_{stem}.opt.npz"
    np.savez(tmp, **values)
    tmp.replace(opt)
    atomic_write_text(fold_dir / POINTER, json.dumps({"weights": weights.name, "optimizer": opt.name,
                                                      "state": state.to_dict()}, indent=1))
    for old in fold_dir.glob("ckpt_*"):
        if not old.name.startswith(stem):
            old.unlink(missing_ok=True)


def save_best(fold_dir: Path, model) -> None:
    tmp = Path(fold_dir) / f"tmp_{BEST}"
    model.save_weights(str(tmp))
    tmp.replace(Path(fold_dir) / BEST)


def load_latest(fold_dir: Path, model) -> TrainState | None:
    """Restore weights and optimiser state; None when there is no checkpoint."""
    pointer = Path(fold_dir) / POINTER
    if not pointer.exists():
        return None
    meta = json.loads(pointer.read_text())
    opt = model.optimizer
    opt.build(model.trainable_variables)
    model.load_weights(str(Path(fold_dir) / meta["weights"]))
    with np.load(Path(fold_dir) / meta["optimizer"], allow_pickle=False) as z:
        saved = [z[k] for k in sorted(z.files)]
    if len(saved) != len(opt.variables):
        raise ValueError(f"{pointer}: optimiser state has {len(saved)} variables, the model needs {len(opt.variables)}")
    for var, val in zip(opt.variables, saved):
        var.assign(val)
    return TrainState.from_dict(meta["state"])
