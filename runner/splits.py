"""Cross-validation splits: seeded k-fold over case ids, written once to WORK/splits.yaml and
validated on every read; a split given with the dataset (nnU-Net splits_final.json) wins."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from segplan.planner.fileio import write_yaml


class SplitError(ValueError):
    """A split file that does not partition the cases; the message names the file and the fold."""


def make_splits(case_ids: list[str], folds: int, seed: int) -> list[dict[str, list[str]]]:
    """Shuffle with a seeded generator, deal the cases into ``folds`` validation sets."""
    ids = sorted(case_ids)
    if folds > len(ids):
        raise SplitError(f"{folds} folds need at least {folds} cases, the dataset has {len(ids)}")
    order = np.random.default_rng(seed).permutation(len(ids))
    val_sets = [sorted(ids[i] for i in order[k::folds]) for k in range(folds)]
    return [{"train": sorted(set(ids) - set(v)), "val": v} for v in val_sets]


def validate_splits(splits, case_ids: list[str], source: str, folds: int | None = None) -> None:
    if not isinstance(splits, list) or not all(isinstance(s, dict) and {"train", "val"} <= set(s) for s in splits):
        raise SplitError(f"{source}: expected a list of {{train: [...], val: [...]}} per fold")
    known = set(case_ids)
    seen: dict[str, int] = {}
    for k, s in enumerate(splits):
        for cid in list(s["train"]) + list(s["val"]):
            if cid not in known:
                raise SplitError(f"{source}: fold {k}: case '{cid}' is not in the dataset")
        overlap = set(s["train"]) & set(s["val"])
        if overlap:
            raise SplitError(f"{source}: fold {k}: {sorted(overlap)[:5]} are both in train and val")
        for cid in s["val"]:
            if cid in seen:
                raise SplitError(f"{source}: case '{cid}' is validated in folds {seen[cid]} and {k}")
            seen[cid] = k
    missing = known - set(seen)
    if missing:
        raise SplitError(f"{source}: {len(missing)} cases are in no validation fold, e.g. {sorted(missing)[:5]}")
    if folds is not None and len(splits) != folds:
        raise SplitError(f"{source}: {len(splits)} folds, the plan says cross_validation.folds = {folds}")


def load_or_make_splits(path: Path, case_ids: list[str], folds: int, seed: int,
                        given: Path | None = None) -> list[dict[str, list[str]]]:
    """The given split file, else the split at ``path`` (WORK/splits.yaml), else a new seeded split
    written there."""
    if given is not None:
        splits = json.loads(Path(given).read_text()) if str(given).endswith(".json") else yaml.safe_load(Path(given).read_text())
        validate_splits(splits, case_ids, str(given), folds)
        return splits
    path = Path(path)
    if path.exists():
        splits = yaml.safe_load(path.read_text())
        validate_splits(splits, case_ids, str(path), folds)
        return splits
    splits = make_splits(case_ids, folds, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_yaml(path, splits, "segplan cross-validation split; edit freely (e.g. patient-level folds), it is validated on use")
    return splits
