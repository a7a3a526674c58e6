"""The work folder of a plan, in one place: what lives where, the plan and dataset loaded once, the
splits, and each fold's frozen plan.

Layout (``WORK`` is the plan's ``dataset.work_dir``, relative to the plan file)::

    WORK/preprocessed/<key>/     cases after preprocessing (<key>: hash of the preprocessing fields)
    WORK/splits.yaml             the seeded split (unless the dataset brings splits_final.json)
    WORK/fold_K/plan.yaml        the plan as it was when fold K started: frozen, never rewritten
    WORK/fold_K/...              checkpoints, history, plots, TensorBoard, finished.json
    WORK/fold_K/validation/      predictions of the fold's validation cases (label maps and, as
                                 <case>.npz, probabilities), metrics, summary
    WORK/previous_stage/<key>/   a cascade's previous-stage predictions on its preprocessed grid
    WORK/cv_summary.md|yaml, cv_boxplots.png, overlays/, quantification.csv
    WORK/calibration.yaml|png, qc.yaml   calibration and quality check fitted on the folds

Nothing else in segplan builds a path under WORK. A fold trains and predicts with its frozen plan's
network, preprocessing and labels: a live plan whose such fields were edited after the fold started
is refused (naming the keys), and prediction never builds a network the weights do not fit.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from segplan.planner.dataset import Dataset
from segplan.planner.layouts import load_dataset
from segplan.planner.plan import Plan
from segplan.planner.plan_file import load_plan, save_plan
from segplan.planner.schema import to_plain

CHECKPOINT_POINTER = "checkpoint_latest.json"
CHECKPOINT_BEST = "checkpoint_best.weights.h5"
FROZEN_PLAN = "plan.yaml"
FINISHED = "finished.json"
HISTORY = "history.csv"
PROGRESS = "progress.png"
TENSORBOARD = "tensorboard"
VALIDATION = "validation"
QC_FEATURES = "qc_features.csv"        # per case what its quality check is computed from (runner/trust)
CALIBRATION = "calibration.yaml"       # these three also in a bundle's model folder
QC_MODEL = "qc.yaml"
QC_FAMILY = "qc_family.yaml"


class PlanChanged(ValueError):
    """The live plan differs from a fold's frozen plan in a field its weights depend on."""


def preprocessing_fields(plan: Plan) -> dict:
    """The plan fields that change preprocessed data (a training edit reuses the cache); the ignore
    label and the orientation only where there is one, so the caches of plans without keep their keys."""
    ds = plan.dataset
    extra = {"ignore_label": ds.ignore_label} if ds.ignore_label is not None else {}
    extra |= {"orientation": ds.orientation} if ds.orientation is not None else {}
    return to_plain({"intensity": plan.intensity, "resampling": plan.resampling, "labels": ds.labels,
                     "channels": ds.channels, "dataset": ds.path, **extra})


def preprocessing_key(plan: Plan) -> str:
    return hashlib.sha1(json.dumps(preprocessing_fields(plan), sort_keys=True).encode()).hexdigest()[:12]


def _flat(d, prefix: str = "") -> dict[str, object]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out |= _flat(v, f"{prefix}{k}.")
        return out
    return {prefix.rstrip("."): d}


def weight_fields(plan: Plan) -> dict[str, object]:
    """Dotted keys of everything a fold's weights depend on: the configuration (a 2d plan's slice axis,
    a cascade's extra inputs), network, preprocessing, labels, channels, a region plan's regions
    (its outputs; no regions add no key) and the orientation images are brought to (where set)."""
    return _flat(to_plain({"configuration": plan.configuration, "slice_axis": plan.slice_axis,
                           "network": plan.network, "intensity": plan.intensity, "resampling": plan.resampling,
                           "dataset": {"labels": plan.dataset.labels, "channels": plan.dataset.channels,
                                       "regions": plan.dataset.regions,
                                       **({"orientation": plan.dataset.orientation}
                                          if plan.dataset.orientation is not None else {})}}))


def changed_keys(frozen: Plan, live: Plan) -> list[str]:
    a, b = weight_fields(frozen), weight_fields(live)
    return sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))


@dataclass(frozen=True)
class Fold:
    """The files of one fold."""

    index: int
    dir: Path

    @property
    def pointer(self) -> Path:
        return self.dir / CHECKPOINT_POINTER

    @property
    def best(self) -> Path:
        return self.dir / CHECKPOINT_BEST

    @property
    def frozen_plan(self) -> Path:
        return self.dir / FROZEN_PLAN

    @property
    def finished(self) -> Path:
        return self.dir / FINISHED

    @property
    def lock(self) -> Path:
        """Held while the fold trains (runner/locks.py); beside the folder, which --restart deletes."""
        return self.dir.parent / f".{self.dir.name}.lock"

    @property
    def failed(self) -> Path:
        """The last error of a run of this fold that failed (removed when a run succeeds)."""
        return self.dir / "failed.txt"

    @property
    def history(self) -> Path:
        return self.dir / HISTORY

    @property
    def progress(self) -> Path:
        return self.dir / PROGRESS

    @property
    def tensorboard(self) -> Path:
        return self.dir / TENSORBOARD

    @property
    def validation(self) -> Path:
        return self.dir / VALIDATION

    @property
    def validation_reference(self) -> Path:
        return self.validation / "reference"

    def validation_probabilities(self, case_id: str) -> Path:
        """A validation case's softmax probabilities on its original grid (float16 .npz, written after
        its label map): the out-of-fold probabilities `segplan select` ranks and ensembles."""
        return self.validation / f"{case_id}.npz"

    def validation_labels(self, case_id: str) -> Path:
        """A validation case's predicted label map (before postprocessing): a cascade's input."""
        return self.validation / f"{case_id}.nii.gz"

    @property
    def validation_summary(self) -> Path:
        return self.validation / "summary.yaml"

    @property
    def validation_metrics(self) -> Path:
        return self.validation / "metrics.csv"

    @property
    def validation_qc_features(self) -> Path:
        """The validation cases' quality-check features: what `segplan summarize` fits the QC model on."""
        return self.validation / QC_FEATURES

    def is_trained(self) -> bool:
        return self.pointer.exists()

    def is_finished(self) -> bool:
        return self.finished.exists()

    def latest_weights(self) -> Path:
        """The weights the checkpoint pointer names (the final weights once training has ended)."""
        if not self.pointer.exists():
            raise FileNotFoundError(f"fold {self.index} has no checkpoint in {self.dir}; run "
                                    f"`segplan run PLAN --fold {self.index}` first")
        return self.dir / json.loads(self.pointer.read_text())["weights"]


class Workspace:
    """A plan file and its work folder; the plan is read once, the dataset once when first needed."""

    def __init__(self, plan_path: Path, plan: Plan | None = None):
        self.plan_path = Path(plan_path)
        self.plan = plan if plan is not None else load_plan(self.plan_path)
        self.base = self.plan_path.parent
        self.root = self.base / self.plan.dataset.work_dir

    @cached_property
    def dataset(self) -> Dataset:
        return load_dataset(self.base / self.plan.dataset.path)

    @property
    def dataset_dir(self) -> Path:
        return self.base / self.plan.dataset.path

    @property
    def preprocessed(self) -> Path:
        return (self.root / "preprocessed" / preprocessing_key(self.plan)).resolve()

    @property
    def previous_stage_maps(self) -> Path:
        """A cascade plan's copy of its previous stage's out-of-fold predictions on its own preprocessed
        grid (runner/cascade.py), beside the cache they align with."""
        return (self.root / "previous_stage" / preprocessing_key(self.plan)).resolve()

    @property
    def splits_file(self) -> Path:
        return self.root / "splits.yaml"

    def splits(self) -> list[dict[str, list[str]]]:
        """The folds' cases; a new split is written once, under a lock (jobs on several nodes)."""
        from segplan.runner.locks import exclusive
        from segplan.runner.splits import load_or_make_splits
        given = self.base / self.plan.dataset.splits_file if self.plan.dataset.splits_file else None
        self.root.mkdir(parents=True, exist_ok=True)
        with exclusive(self.root / ".splits.lock", "the split file"):
            return load_or_make_splits(self.splits_file, [c.case_id for c in self.dataset.cases],
                                       self.plan.cross_validation.folds, self.plan.cross_validation.seed, given)

    def fold(self, k: int) -> Fold:
        if not 0 <= k < self.plan.cross_validation.folds:
            raise ValueError(f"fold {k}: the plan has folds 0..{self.plan.cross_validation.folds - 1}")
        return Fold(k, self.root / f"fold_{k}")

    def folds(self) -> list[Fold]:
        return [self.fold(k) for k in range(self.plan.cross_validation.folds)]

    def freeze(self, k: int) -> Plan:
        """Write the live plan into fold k at its start (until its first checkpoint exists); later
        calls check the live plan against it and return the fold's plan (see ``fold_plan``)."""
        fold = self.fold(k)
        if not fold.is_trained():  # no weights depend on it yet: (re)write it
            fold.dir.mkdir(parents=True, exist_ok=True)
            save_plan(self.plan, fold.frozen_plan)
            return self.plan
        return self.fold_plan(k)

    def fold_plan(self, k: int) -> Plan:
        """The plan fold k trains and predicts with: its frozen network, preprocessing and labels;
        refuses a live plan that changed any of those."""
        fold = self.fold(k)
        if not fold.frozen_plan.exists():
            return self.plan
        frozen = load_plan(fold.frozen_plan, check_paths=False)
        diff = changed_keys(frozen, self.plan)
        if diff:
            raise PlanChanged(f"{self.plan_path}: fold {k} was trained with other values of {', '.join(diff[:8])}"
                              + (f" (and {len(diff) - 8} more)" if len(diff) > 8 else "")
                              + f" (frozen in {fold.frozen_plan}); undo the edit, or `segplan run --fold {k} --restart` "
                              "to train the fold again with it")
        return frozen.replace(training=self.plan.training, inference=self.plan.inference,
                              cross_validation=self.plan.cross_validation, dataset=self.plan.dataset)

    # reports over all folds
    @property
    def cv_summary_md(self) -> Path:
        return self.root / "cv_summary.md"

    @property
    def cv_summary_yaml(self) -> Path:
        return self.root / "cv_summary.yaml"

    @property
    def cv_boxplots(self) -> Path:
        return self.root / "cv_boxplots.png"

    @property
    def cv_report_html(self) -> Path:
        return self.root / "cv_report.html"

    @property
    def overlays(self) -> Path:
        return self.root / "overlays"

    @property
    def quantification(self) -> Path:
        return self.root / "quantification.csv"

    @property
    def cluster(self) -> Path:
        """Jobs submitted by `segplan submit` (jobs.yaml) and their logs (logs/)."""
        return self.root / "cluster"

    @property
    def postprocessing(self) -> Path:
        return self.root / "postprocessing.yaml"

    @property
    def calibration(self) -> Path:
        """Temperatures fitted on the out-of-fold probabilities, with their ECE (runner/trust)."""
        return self.root / CALIBRATION

    @property
    def calibration_plot(self) -> Path:
        return self.root / "calibration.png"

    @property
    def qc_model(self) -> Path:
        """The quality score and flag rule chosen on the folds (runner/trust)."""
        return self.root / QC_MODEL
