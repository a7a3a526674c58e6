"""Mirroring rules of a plan: along which axes training flips patches, and whether prediction
averages flipped views. Flips that swap what the labels mean (left and right) or that the network
rarely saw in training cost Dice; the figures are in the constants' comments and the plans' reasons."""
from __future__ import annotations

import re
from collections import Counter

from segplan.planner.dataset import left_right_axis
from segplan.planner.fingerprint import Fingerprint

# Test-time mirroring averages flipped views: it pays only where training showed the network many of
# them (nnU-Net mirrors every patch, each axis with p 0.5). With the paper's p 0.15 it cost Dice on
# Hippocampus fold 0 (5 CPU-minutes, benchmarks/plan_variants.py --repredict): 0.868 / 0.859 without,
# 0.793 / 0.803 with; mirroring every patch in training instead cost more at that budget (0.816 / 0.814,
# 0.826 / 0.830 with test-time mirroring). Below this training probability a plan predicts unmirrored.
MIRROR_TTA_MIN_P = 0.5
MIRROR_TTA_EVIDENCE = "Hippocampus fold 0, 5 CPU-minutes: Dice 0.868 / 0.859 without, 0.793 / 0.803 with"
MIRROR_TTA_WHY = ("test-time mirroring only where training mirrors at least half the patches (training.augmentation."
                  "mirror_p >= 0.5, as nnU-Net): with the paper's 0.15 the flipped views are ones the network rarely saw "
                  f"({MIRROR_TTA_EVIDENCE})")

def mirror_axes(fp: Fingerprint, slice_axis: int | None, reasons: dict) -> list[int]:
    """Every axis of the patch, except, where labels (or a region plan's regions) name a side, the
    axis that runs along the patient's left-right direction in most training cases: a flip along it
    turns a left lung into a right one drawn where the left should be, and the network learns to
    confuse them (a lone 'right_lung' too: flipped, the left lung wears its label)."""
    patch_axes = [a for a in range(3) if a != slice_axis]
    sided = _side_names([*fp.labels, *fp.regions])
    votes = Counter(left_right_axis(c.direction) for c in fp.cases)
    lr = votes.most_common(1)[0][0] if votes else None
    if not sided or lr not in patch_axes:
        return list(range(len(patch_axes)))
    names = ", ".join(sided)
    reasons["training.augmentation.mirror_axes"] = (
        f"every axis of the patch but {'zyx'[lr]}, the patient's left-right axis in {votes[lr]} of {len(fp.cases)} "
        f"training cases (their direction cosines): the labels name sides ({names}), which a flip along it would swap")
    return [i for i, a in enumerate(patch_axes) if a != lr]


def _side_names(names) -> list[str]:
    """The label or region names that name a side ('left_lung', 'Kidney Right', 'rightLung'; not
    'cleft' or 'bright'): one side-specific structure is enough, as a flip draws it on the other side.
    A region plan's labels are named by value (label_1, ...): its region names carry the sides."""
    words = {n: re.sub(r"(?<=[a-z])(?=[A-Z])", "_", n).lower() for n in names}   # 'LungLeft' -> 'lung_left'
    return [n for n, w in words.items() if re.search(r"(?<![a-z])(left|right)", w)]
