"""The plan's dataset section beyond names and paths, from the fingerprint: label groups (the paper's
lungs = left + right), regions and the ignore label (dataset.json), the orientation the training
cases share, and a region plan's sigmoids started at each region's prior; each with its reason."""
from __future__ import annotations

import dataclasses
import math

from segplan.planner.fingerprint import Fingerprint
from segplan.planner.orientation import case_orientations, majority, orientation_note
from segplan.planner.plan import DatasetSection, Plan


def label_groups(labels: dict[str, int]) -> dict[str, list[str]]:
    """'left_lung' + 'right_lung' (any spelling with left/right) -> 'lungs', as the paper reports them."""
    lefts = [n for n in labels if "left" in n.lower()]
    groups = {}
    for left in lefts:
        right = left.lower().replace("left", "right")
        match = [n for n in labels if n.lower() == right]
        if match:
            stem = left.lower().replace("left", "").strip("_ ") or "both"
            groups[stem + ("s" if not stem.endswith("s") else "")] = [left, match[0]]
    return groups


def label_handling(fp: Fingerprint, ds: DatasetSection, reasons: dict) -> DatasetSection:
    """The dataset's regions and ignore label (dataset.json, via the fingerprint) in the plan, and why.
    A region plan is scored per region, so the left/right label groups are not made for it."""
    if fp.regions:
        reasons["dataset.regions"] = ("dataset.json writes labels as lists: nnU-Net's region-based training, one "
                                      "sigmoid output per region (they may overlap), trained with Tversky per region "
                                      "+ binary cross-entropy, evaluated and postprocessed per region")
        reasons["dataset.regions_class_order"] = ("dataset.json's regions_class_order: where region i is predicted, "
                                                  "its value is written, later regions over earlier ones; the "
                                                  "encompassing region first")
        reasons["dataset.labels"] = ("the label values the regions unite, named by value: dataset.json names "
                                     "regions, not labels")
        ds = dataclasses.replace(ds, regions={k: list(v) for k, v in fp.regions.items()},
                                 regions_class_order=list(fp.regions_class_order), label_groups={})
        reasons["training.output_bias"] = ("each region's sigmoid starts at the log-odds of its share of the training "
                                           f"voxels ({REGION_PRIOR_WHY})")
    if fp.ignore_label is not None:
        ignored = sum(c.ignored_voxels for c in fp.cases)
        annotated = sum(sum(c.class_voxels) for c in fp.cases)
        share = annotated / max(annotated + ignored, 1)
        reasons["dataset.ignore_label"] = (f"dataset.json's 'ignore' label: {share:.1%} of the label voxels are "
                                           "annotated; the rest train nothing (loss masked, never a patch centre), "
                                           "are not scored, and are predicted like any other voxel")
        ds = dataclasses.replace(ds, ignore_label=fp.ignore_label)
    return ds


def with_orientation(fp: Fingerprint, ds: DatasetSection, reasons: dict) -> DatasetSection:
    """The orientation most training cases share, in the plan, and which cases differ (issue 41)."""
    codes = case_orientations(fp)
    code = majority(list(codes.values()))
    if code is None:
        return ds
    reasons["dataset.orientation"] = orientation_note(codes, code)
    return dataclasses.replace(ds, orientation=code)


REGION_PRIOR_WHY = ("from p = 0.5 everywhere, Keras' default, a 3-minute CPU fold of Hippocampus with regions "
                    "hippocampus [1, 2] and posterior [2] over-segmented, 1.28x and 1.41x the reference volume, Dice "
                    "0.847 / 0.801 against 0.895 / 0.875 from per-label training; started from the prior, 0.901 / "
                    "0.871 at 1.02x / 1.00x the volume (benchmarks/region_training.py)")


def with_region_prior(plan: Plan, fp: Fingerprint) -> Plan:
    """A region plan whose sigmoids start at each region's prior (``region_output_bias``); others as they are."""
    if not plan.dataset.regions:
        return plan
    bias = region_output_bias(fp, plan.dataset.regions)
    return plan.replace(training=dataclasses.replace(plan.training, output_bias=bias))


def region_output_bias(fp: Fingerprint, regions: dict[str, list[int]]) -> list[float]:
    """Per region, the log-odds of its share of the training voxels (the fingerprint's class ratio)."""
    index = {v: i for i, v in enumerate(fp.labels.values())}
    out = []
    for values in regions.values():
        p = min(max(sum(fp.class_ratio[index[v]] for v in values), 1e-4), 1 - 1e-4)
        out.append(round(math.log(p / (1 - p)), 4))
    return out
