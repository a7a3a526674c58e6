"""Plan files: commented YAML written atomically, read back with every problem named by key and line.

``load_plan`` refuses, naming the key and its line: unknown or misspelled keys, wrong types, sizes
that are not positive, a patch the pooling does not divide, probabilities outside [0, 1], unknown
presets, architectures, schemes or conventions, residual blocks that do not match the stages, a
missing dataset, more folds than cases, regions whose values are not foreground labels (or none),
a regions_class_order that does not match the regions, an ignore label that is a label value, an
unknown schema version, NaN or infinite numbers (.nan,
.inf, or a float too large, which YAML reads as .inf), seeds that NumPy's and Keras' seeding refuse.
Keys added since a plan was written take their defaults (an older plan still loads, as the network
it was trained with).
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from segplan.planner.fileio import write_text
from segplan.planner.heuristics import RESENC_BLOCKS
from segplan.planner.plan import PLAN_CONVENTIONS, PRESETS, SCHEMA_VERSION, Plan, patch_axes, pool_divisor
from segplan.planner.schema import Reader, SchemaError, dump_yaml, load_yaml_with_lines, to_plain


def save_plan(plan: Plan, path: str | Path, reasons: dict[str, str] | None = None) -> None:
    header = (f"segplan plan '{plan.name}'. Edit by hand, then run `segplan check {Path(path).name}`.\n"
              "Axes are (z, y, x); paths are relative to this file.")
    write_text(Path(path), dump_yaml(plan, reasons, header))


def load_plan(path: str | Path, check_paths: bool = True) -> Plan:
    """Read and validate a plan; raise SchemaError listing every problem with its key and line."""
    path = Path(path)
    if not path.exists():
        raise SchemaError([f"{path}: no such plan file"])
    data, lines = load_yaml_with_lines(path)
    reader = Reader(str(path), lines)
    if isinstance(data, dict) and data.get("schema_version") not in (None, SCHEMA_VERSION):
        reader.error("schema_version", f"version {data.get('schema_version')!r} is unknown; this segplan reads {SCHEMA_VERSION}")
        raise SchemaError(reader.errors)
    plan = reader.build(Plan, data)
    if reader.errors:
        raise SchemaError(reader.errors)
    _validate(plan, reader, path.parent if check_paths else None)
    if reader.errors:
        raise SchemaError(reader.errors)
    return plan


def _validate(plan: Plan, r: Reader, base_dir: Path | None) -> None:
    if plan.preset not in PRESETS:
        r.error("preset", f"unknown preset '{plan.preset}'; known: {', '.join(PRESETS)}")
    ds, tr, net = plan.dataset, plan.training, plan.network
    if plan.configuration == "3d_cascade_fullres" and not plan.previous_stage:
        r.error("previous_stage", "a 3d_cascade_fullres plan needs the 3d_lowres plan file it builds on")
    if plan.configuration != "3d_cascade_fullres" and plan.previous_stage is not None:
        r.error("previous_stage", f"only a 3d_cascade_fullres plan has a previous stage; this one is "
                                  f"'{plan.configuration}': set it to null")
    if base_dir is not None and plan.previous_stage:
        _check_previous_stage(plan, base_dir, r)
    if base_dir is not None and not (base_dir / ds.path).is_dir():
        r.error("dataset.path", f"folder {(base_dir / ds.path).resolve()} does not exist")
    elif base_dir is not None:
        _check_folds(plan, base_dir, r)
    if ds.labels.get("background", ds.labels.get(next(iter(ds.labels), ""), None)) != 0:
        r.error("dataset.labels", "the first label must be background with value 0")
    if len(set(ds.labels.values())) != len(ds.labels):
        r.error("dataset.labels", "two labels share a value")
    for g, members in ds.label_groups.items():
        for m in members:
            if m not in ds.labels:
                r.error(f"dataset.label_groups.{g}", f"'{m}' is not one of dataset.labels {list(ds.labels)}")
    _check_regions(ds, r)
    _check_orientation(ds, r)
    _check_output_bias(plan, r)
    if not ds.channels:
        r.error("dataset.channels", "needs at least one channel")
    elif len(plan.intensity.normalization) != len(ds.channels):
        r.error("intensity.normalization", f"{len(plan.intensity.normalization)} entries for the {len(ds.channels)} "
                                           "channels of dataset.channels")
    for i, n in enumerate(plan.intensity.normalization):
        if n.scheme == "ct" and (n.clip is None or len(n.clip) != 2 or n.clip[0] >= n.clip[1]):
            r.error(f"intensity.normalization.{i}.clip", "a ct channel needs [low, high] with low < high")
        if n.std <= 0:
            r.error(f"intensity.normalization.{i}.std", "must be > 0")
        if n.zscore == "dataset" and n.scheme != "ct":
            r.error(f"intensity.normalization.{i}.zscore", f"'dataset' needs scheme: ct (dataset statistics are in HU); "
                                                           f"scheme '{n.scheme}' normalises per case: use zscore: case")
    for case, conv in plan.intensity.conventions.items():
        if conv not in PLAN_CONVENTIONS:
            r.error(f"intensity.conventions.{case}", f"'{conv}' is not one of {', '.join(PLAN_CONVENTIONS)}")
    _positive_list(r, "resampling.target_spacing", plan.resampling.target_spacing, 3, float)
    dims = _check_dims(plan, r)
    _positive_list(r, "training.patch_size", tr.patch_size, dims, int)
    n_stages = len(net.filters)
    if n_stages < 1 or any(f <= 0 for f in net.filters):
        r.error("network.filters", "needs at least one stage, every count > 0")
    if len(net.pool_sizes) != n_stages - 1:
        r.error("network.pool_sizes", f"{len(net.pool_sizes)} entries; the {n_stages} stages of network.filters "
                                      f"need {n_stages - 1}")
    if len(net.kernel_sizes) != n_stages:
        r.error("network.kernel_sizes", f"{len(net.kernel_sizes)} entries; the {n_stages} stages of network.filters "
                                        f"need {n_stages}")
    for i, p in enumerate(net.pool_sizes):
        if len(p) != dims or any(v not in (1, 2) for v in p):
            r.error(f"network.pool_sizes.{i}", f"{p}: each entry is {dims} values of 1 or 2{_AXES_NOTE[dims]}")
    for i, k in enumerate(net.kernel_sizes):
        if len(k) != dims or any(v not in (1, 3, 5) for v in k):
            r.error(f"network.kernel_sizes.{i}", f"{k}: each entry is {dims} values of 1, 3 or 5{_AXES_NOTE[dims]}")
    if len(tr.patch_size) == dims and all(len(p) == dims for p in net.pool_sizes):
        div = pool_divisor(net)
        names = patch_axes(plan)
        for a, (p, d) in enumerate(zip(tr.patch_size, div)):
            if d and p % d:
                r.error(f"training.patch_size.{a}", f"{p} is not divisible by the total pooling {d} of "
                                                    f"network.pool_sizes on axis {names[a]}; use "
                                                    f"{max(d, round(p / d) * d)}")
    if net.convs_per_stage < 1:
        r.error("network.convs_per_stage", "must be >= 1")
    if net.architecture == "residual_encoder" and (len(net.blocks_per_stage) != n_stages
                                                   or any(b < 1 for b in net.blocks_per_stage)):
        r.error("network.blocks_per_stage", f"{net.blocks_per_stage}: a residual_encoder needs one count >= 1 per "
                                            f"stage ({n_stages} stages), e.g. nnU-Net's "
                                            f"{list(RESENC_BLOCKS[:n_stages])}")
    if net.architecture == "plain" and net.blocks_per_stage:
        r.error("network.blocks_per_stage", "only a residual_encoder has residual blocks; a plain network has "
                                            "convs_per_stage: set it to [] or the architecture to residual_encoder")
    if base_dir is not None and tr.initial_weights is not None and not (base_dir / tr.initial_weights).is_file():
        r.error("training.initial_weights", f"file {(base_dir / tr.initial_weights).resolve()} does not exist")
    if tr.workers < 0:
        r.error("training.workers", f"{tr.workers} must be >= 0")
    if plan.memory.measured_gb is not None and plan.memory.measured_gb <= 0:
        r.error("memory.measured_gb", f"{plan.memory.measured_gb} must be > 0 or null")
    for key, v in (("training.batch_size", tr.batch_size), ("inference.batch_size", plan.inference.batch_size),
                   ("training.schedule.max_epochs", tr.schedule.max_epochs),
                   ("training.schedule.iterations_per_epoch", tr.schedule.iterations_per_epoch),
                   ("cross_validation.folds", plan.cross_validation.folds)):
        if v < 1:
            r.error(key, f"{v} must be >= 1")
    for key, v in (("training.learning_rate", tr.learning_rate), ("training.schedule.min_learning_rate", tr.schedule.min_learning_rate)):
        if v <= 0:
            r.error(key, f"{v} must be > 0")
    if tr.schedule.time_budget_minutes is not None and tr.schedule.time_budget_minutes <= 0:
        r.error("training.schedule.time_budget_minutes", "must be > 0 or null")
    if tr.schedule.validation_every < 1:
        r.error("training.schedule.validation_every", f"{tr.schedule.validation_every} must be >= 1")
    elif tr.schedule.monitor == "val_loss" and tr.schedule.validation_every != 1:
        r.error("training.schedule.validation_every", "must be 1 with monitor: val_loss (the plateau, early stop and "
                                                      "best checkpoint watch the validation loss every epoch)")
    if not 0 < tr.schedule.plateau_factor <= 1:
        r.error("training.schedule.plateau_factor", "must be in (0, 1]")
    probs = {"training.sampling.foreground_oversampling": tr.sampling.foreground_oversampling,
             "inference.overlap": plan.inference.overlap}
    probs |= {f"training.augmentation.{f.name}": getattr(tr.augmentation, f.name)
              for f in dataclasses.fields(tr.augmentation) if f.name.endswith("_p")}
    for key, v in probs.items():
        if not 0.0 <= v <= 1.0:
            r.error(key, f"{v} is a probability/fraction and must be within [0, 1]")
    if plan.inference.overlap >= 1.0:
        r.error("inference.overlap", "must be < 1")
    for i, a in enumerate(tr.augmentation.mirror_axes):
        if a not in range(dims):
            r.error(f"training.augmentation.mirror_axes.{i}", f"{a}: the patch's axes are "
                                                              f"{', '.join(map(str, range(dims)))}")
    for f in dataclasses.fields(tr.augmentation):
        v = getattr(tr.augmentation, f.name)
        if isinstance(v, list) and f.name != "mirror_axes" and (len(v) != 2 or v[0] > v[1]):
            r.error(f"training.augmentation.{f.name}", f"{v}: expected [low, high] with low <= high")
    for key in _non_finite(to_plain(plan)):
        r.error(key, "must be a finite number (not .nan or .inf)")
    for key, seed in (("training.seed", tr.seed), ("cross_validation.seed", plan.cross_validation.seed)):
        if not 0 <= seed < 2 ** 32:
            r.error(key, f"{seed} must be within 0..{2 ** 32 - 1} (the seeds NumPy and Keras accept)")
    if tr.loss.tversky_alpha < 0 or tr.loss.tversky_beta < 0 or tr.loss.tversky_weight < 0 or tr.loss.cross_entropy_weight < 0:
        r.error("training.loss", "weights, alpha and beta must be >= 0")


def _check_output_bias(plan, r: Reader) -> None:
    from segplan.planner.labels import label_model
    bias, lm = plan.training.output_bias, label_model(plan)
    if bias and len(bias) != lm.n_outputs:
        r.error("training.output_bias", f"{len(bias)} values for the network's {lm.n_outputs} outputs "
                                        f"({', '.join(lm.outputs)}): one each, or [] for 0")


def _check_orientation(ds, r: Reader) -> None:
    from segplan.planner.orientation import valid_code
    if ds.orientation is not None and not valid_code(ds.orientation):
        r.error("dataset.orientation", f"{ds.orientation!r} is no orientation: three letters, one of each of R/L, "
                                       "A/P and S/I (LPS, RAS, ...), or null to use images as stored")


def _check_regions(ds, r: Reader) -> None:
    """dataset.regions, regions_class_order and ignore_label against dataset.labels: every region a
    non-empty set of foreground label values, one written label value per region, an ignore value
    that is no label (it has no output and is never predicted)."""
    values = set(ds.labels.values())
    foreground = sorted(values - {0})
    for name, members in ds.regions.items():
        key = f"dataset.regions.{name}"
        if not members:
            r.error(key, "an empty region: list the label values it unites, e.g. [1, 2]")
        elif 0 in members:
            r.error(key, f"{members} holds background (0): a region is foreground only; one of {foreground}")
        elif set(members) - values:
            r.error(key, f"{sorted(set(members) - values)} are not values of dataset.labels {foreground}")
        elif len(set(members)) != len(members):
            r.error(key, f"{members} names a value twice")
    if ds.regions and len(ds.regions_class_order) != len(ds.regions):
        r.error("dataset.regions_class_order", f"{len(ds.regions_class_order)} values for the {len(ds.regions)} "
                                               f"regions of dataset.regions ({', '.join(ds.regions)}): one label "
                                               "value to write per region, in their order")
    if not ds.regions and ds.regions_class_order:
        r.error("dataset.regions_class_order", "without dataset.regions there is nothing to order: set it to []")
    for i, v in enumerate(ds.regions_class_order):
        if v not in foreground:
            r.error(f"dataset.regions_class_order.{i}", f"{v} is not a foreground value of dataset.labels {foreground}")
    if ds.regions and ds.label_groups:
        r.error("dataset.label_groups", "a region plan is scored per region: write each group as a region of "
                                        "dataset.regions instead, and set label_groups to {}")
    if ds.ignore_label is not None and (ds.ignore_label in values or ds.ignore_label < 0):
        r.error("dataset.ignore_label", f"{ds.ignore_label} must be a value >= 0 that is none of dataset.labels' "
                                        f"values {sorted(values)} (unannotated voxels have no class)")


def _check_folds(plan: Plan, base_dir: Path, r: Reader) -> None:
    """Refuse more folds than cases before any work (each fold must validate at least one case)."""
    from segplan.planner.dataset import DatasetError
    from segplan.planner.layouts import load_dataset
    try:
        n = len(load_dataset(base_dir / plan.dataset.path, infer_plain=False).cases)
    except DatasetError as e:
        r.error("dataset.path", str(e))
        return
    if plan.cross_validation.folds > n:
        r.error("cross_validation.folds", f"{plan.cross_validation.folds} folds need at least as many cases; the "
                                          f"dataset has {n}: set folds to {n} or fewer")


def _check_previous_stage(plan: Plan, base_dir: Path, r: Reader) -> None:
    """A cascade's source: an existing 3d_lowres plan of the same dataset, channels, labels and
    split (the cascade trains on its out-of-fold predictions)."""
    path = base_dir / plan.previous_stage
    if not path.is_file():
        r.error("previous_stage", f"{path.resolve()} does not exist: a cascade needs the 3d_lowres plan it builds on "
                                  "(`segplan plan DATASET -o DIR/NAME.yaml --configurations all` writes both)")
        return
    try:
        prev = load_plan(path, check_paths=False)
    except SchemaError as e:
        r.error("previous_stage", f"{path}: not a valid plan: {e.problems[0]}")
        return
    if prev.configuration != "3d_lowres":
        r.error("previous_stage", f"{path} is a '{prev.configuration}' plan; a cascade builds on a 3d_lowres plan")
    if (path.parent / prev.dataset.path).resolve() != (base_dir / plan.dataset.path).resolve():
        r.error("previous_stage", f"{path} plans dataset {(path.parent / prev.dataset.path).resolve()}, this plan "
                                  f"{(base_dir / plan.dataset.path).resolve()}: a cascade needs one dataset")
    for key, mine, theirs in (("dataset.labels", plan.dataset.labels, prev.dataset.labels),
                              ("dataset.channels", plan.dataset.channels, prev.dataset.channels),
                              ("cross_validation", to_plain(plan.cross_validation), to_plain(prev.cross_validation))):
        if mine != theirs:
            r.error("previous_stage", f"{path} has {key} {theirs}, this plan {mine}: a cascade needs the same "
                                      f"(edit {key} of one of them)")
    given = [(b / p.dataset.splits_file).resolve() if p.dataset.splits_file else None
             for b, p in ((base_dir, plan), (path.parent, prev))]
    if given[0] != given[1]:
        r.error("previous_stage", f"{path} splits by {given[1] or 'its own seeded split'}, this plan by "
                                  f"{given[0] or 'its own seeded split'}: a cascade needs the same split")


def _non_finite(value, key: str = "") -> list[str]:
    """Dotted keys of the NaN and infinite numbers in a plan's plain values (nothing in a plan is either:
    a NaN passes every ``<`` check unnoticed, then turns training's losses into NaN)."""
    if isinstance(value, dict):
        return [k for name, v in value.items() for k in _non_finite(v, f"{key}{name}.")]
    if isinstance(value, list):
        return [k for i, v in enumerate(value) for k in _non_finite(v, f"{key}{i}.")]
    return [key.rstrip(".")] if isinstance(value, float) and not math.isfinite(value) else []


_AXES_NOTE = {2: " (a 2d plan: its two in-plane axes)", 3: " (z, y, x)"}


def _check_dims(plan: Plan, r: Reader) -> int:
    """The patch's axes: 2 for a 2d plan (which names the axis it slices along), else 3."""
    if plan.configuration == "2d":
        if plan.slice_axis not in (0, 1, 2):
            r.error("slice_axis", f"{plan.slice_axis}: a 2d plan slices along axis 0 (z), 1 (y) or 2 (x)")
        return 2
    if plan.slice_axis is not None:
        r.error("slice_axis", f"only a 2d plan slices; this one is '{plan.configuration}': set it to null")
    return 3


def _positive_list(r: Reader, key: str, values: list, n: int, kind: type) -> None:
    if len(values) != n:
        r.error(key, f"expected {n} values{_AXES_NOTE[n]}, found {len(values)}")
    for i, v in enumerate(values):
        if v <= 0:
            r.error(f"{key}.{i}", f"{v} must be > 0")
