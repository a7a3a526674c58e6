"""Plots people would rather look at than read: training curves (the paper's Figure 4)."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from segplan.planner.fileio import save_figure  # noqa: E402


def plot_progress(rows: list[dict], path: Path) -> None:
    """Loss and Dice of training and validation per epoch, learning rate on a log axis."""
    if not rows:
        return
    ep = [r["epoch"] for r in rows]
    scored = [r for r in rows if not math.isnan(float(r["val_loss"]))]  # validation_every > 1 leaves gaps
    val_ep = [r["epoch"] for r in scored]
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(15, 4))
    a1.plot(ep, [r["train_loss"] for r in rows], label="train")
    a1.plot(val_ep, [r["val_loss"] for r in scored], label="validation")
    a1.set(title="loss (Tversky + CE)", xlabel="epoch")
    a1.legend()
    a2.plot(ep, [r["train_dice"] for r in rows], label="train (soft)")
    a2.plot(val_ep, [r["val_dice"] for r in scored], label="validation (mean fg)")
    a2.set(title="Dice", xlabel="epoch", ylim=(0, 1))
    a2.legend()
    a3.semilogy(ep, [r["learning_rate"] for r in rows])
    a3.set(title="learning rate", xlabel="epoch")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
