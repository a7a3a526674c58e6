"""The plan: every hyper-parameter the runner uses, as frozen dataclasses saved as commented YAML.

Axis order everywhere in the plan is (z, y, x). Paths are relative to the plan file.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from planner.fileio import write_text
from planner.schema import Reader, SchemaError, doc, dump_yaml, load_yaml_with_lines

SCHEMA_VERSION = 1
PRESETS = ("default", "miscnn-covid19", "cpu")
PLAN_CONVENTIONS = ("hu", "windowed", "shifted_hu", "other")


@dataclass(frozen=True)
class DatasetSection:
    path: str = doc("dataset folder, relative to this plan file")
    work_dir: str = doc("where preprocessed data, folds and reports go, relative to this plan file")
    channels: list[str] = doc("input channels, in file order (_0000, _0001, ...)")
    labels: dict[str, int] = doc("class name -> value in the label files; the order is the network's class order")
    label_groups: dict[str, list[str]] = doc("extra classes for evaluation, the union of these labels (the paper's lungs = left + right)")
    splits_file: str | None = doc("a split given with the dataset (nnU-Net splits_final.json), used instead of a new one; null: none")


@dataclass(frozen=True)
class ChannelNormalization:
    channel: str = doc("channel name")
    scheme: Literal["ct", "zscore", "none"] = doc("ct: clip to 'clip' HU, then z-score; zscore: per case over the crop box (the bounding box of the non-zero region); none")
    clip: list[float] | None = doc("[low, high] in HU (ct only)")
    zscore: Literal["dataset", "case"] = doc("dataset: the mean/std below (nnU-Net; ct only); case: each case's own (MIScnn)")
    mean: float = doc("dataset foreground mean in HU, of the fingerprint's sample before clipping, as nnU-Net (zscore: dataset)")
    std: float = doc("dataset foreground std in HU, likewise (zscore: dataset)")


@dataclass(frozen=True)
class IntensitySection:
    windowed_range: list[float] = doc("the HU window that 0..255 ('windowed') CT cases were scaled from; they are mapped back to HU with it")
    conventions: dict[str, str] = doc("per CT case: 'hu', 'windowed' (0..255 from windowed_range) or 'shifted_hu' (HU + 1024), as detected; edit to override")
    normalization: list[ChannelNormalization] = doc("one entry per channel")


@dataclass(frozen=True)
class ResamplingSection:
    target_spacing: list[float] = doc("mm (z, y, x)")
    image_order: int = doc("spline order for images (3 cubic, 1 linear)")
    label_mode: Literal["onehot_linear", "nearest"] = doc("labels: per-class linear then argmax (never invents classes), or nearest")
    anisotropy_threshold: float = doc("an axis this many times coarser than the others is resampled separately")
    anisotropic_order: int = doc("order along that coarse axis (0 nearest, as nnU-Net)")


@dataclass(frozen=True)
class NetworkSection:
    filters: list[int] = doc("filters per stage, first stage first")
    pool_sizes: list[list[int]] = doc("max-pool size (z, y, x) after each stage but the last")
    kernel_sizes: list[list[int]] = doc("convolution kernel (z, y, x) per stage (1 along an axis much coarser than the others)")
    convs_per_stage: int = doc("convolutions per stage")
    normalization: Literal["batch", "none"] = doc("after each convolution")
    batchnorm_momentum: float = doc("Keras BatchNormalization momentum")
    activation: Literal["relu", "leaky_relu"] = doc("after each convolution")
    upsampling: Literal["transpose", "upsample"] = doc("transposed convolution (paper) or nearest upsampling + conv")


@dataclass(frozen=True)
class SamplingSection:
    foreground_oversampling: float = doc("share of patches centred on a random foreground voxel (0: plain random crops, as the paper)")


@dataclass(frozen=True)
class AugmentationSection:
    mirror_p: float = doc("probability per sample; each axis in mirror_axes flipped with p 0.5 when applied")
    mirror_axes: list[int] = doc("axes of the patch (0 z, 1 y, 2 x)")
    elastic_p: float = doc("elastic deformation probability")
    elastic_alpha: list[float] = doc("deformation magnitude range")
    elastic_sigma: list[float] = doc("deformation smoothness range")
    rotation_p: float = doc("rotation probability")
    rotation_degrees: float = doc("maximum rotation about each axis")
    scaling_p: float = doc("scaling probability")
    scaling_range: list[float] = doc("zoom range")
    brightness_p: float = doc("multiplicative brightness probability")
    brightness_range: list[float] = doc("multiplier range")
    contrast_p: float = doc("contrast probability")
    contrast_range: list[float] = doc("contrast factor range")
    gamma_p: float = doc("gamma probability")
    gamma_range: list[float] = doc("gamma range (statistics retained)")
    noise_p: float = doc("Gaussian noise probability")
    noise_variance: list[float] = doc("noise variance range")


@dataclass(frozen=True)
class LossSection:
    tversky_alpha: float = doc("weight of false negatives in the Tversky index (0.5 with beta 0.5 = soft Dice)")
    tversky_beta: float = doc("weight of false positives")
    tversky_weight: float = doc("weight of the Tversky term")
    cross_entropy_weight: float = doc("weight of the categorical cross-entropy term")
    smooth: float = doc("added to numerator and denominator")


@dataclass(frozen=True)
class ScheduleSection:
    max_epochs: int = doc("upper bound on epochs")
    iterations_per_epoch: int = doc("batches per epoch")
    monitor: Literal["train_loss", "val_loss"] = doc("what the plateau, early stop and best checkpoint watch (the paper: train_loss)")
    plateau_factor: float = doc("learning rate x this after 'plateau_patience' epochs without improvement")
    plateau_patience: int = doc("epochs")
    plateau_min_delta: float = doc("smallest change that counts as an improvement")
    plateau_cooldown: int = doc("epochs after a reduction before counting again")
    min_learning_rate: float = doc("floor of the learning rate")
    early_stopping_patience: int = doc("stop after this many epochs without improvement")
    validation_patches: int = doc("patches from the fold's validation cases scored every epoch")
    time_budget_minutes: float | None = doc("stop training after this many minutes (null: no limit); the learning rate then decays over the budget")


@dataclass(frozen=True)
class TrainingSection:
    patch_size: list[int] = doc("voxels (z, y, x)")
    batch_size: int = doc("patches per step")
    learning_rate: float = doc("Adam's initial learning rate")
    mixed_precision: bool = doc("float16/bfloat16 activations (GPU); off on CPU")
    seed: int = doc("seeds sampling and augmentation")
    sampling: SamplingSection = doc("")
    augmentation: AugmentationSection = doc("batchgenerators transforms, applied on the fly")
    loss: LossSection = doc("multi-class Tversky + categorical cross-entropy")
    schedule: ScheduleSection = doc("")
    workers: int = doc("processes that make augmented batches ahead of the training step (0: one thread of the "
                       "training process); the batches are the same whatever the number", default=1)


@dataclass(frozen=True)
class InferenceSection:
    overlap: float = doc("fraction of the patch shared by neighbouring windows (0.5: half a patch, the paper)")
    weighting: Literal["constant", "gaussian"] = doc("how overlapping windows are averaged")
    mirroring: bool = doc("test-time augmentation by flipping the mirror axes")
    batch_size: int = doc("windows per network call")
    checkpoint: Literal["final", "best"] = doc(
        "weights that predict the validation cases and new images: final (the paper, nnU-Net) or best (chosen by "
        "training.schedule.monitor; with val_loss that choice is made on the validation cases, and the report says so)",
        default="final")


@dataclass(frozen=True)
class CrossValidationSection:
    folds: int = doc("number of folds")
    seed: int = doc("seeds the split")


@dataclass(frozen=True)
class MemorySection:
    gpu_memory_gb: float = doc("budget the patch and batch were fitted to")
    budget_source: str = doc("where the budget came from")
    estimate_gb: float = doc("planner/memory.py's estimate of training memory for this patch and batch")


@dataclass(frozen=True)
class Plan:
    schema_version: int = doc("plan format version")
    name: str = doc("plan name")
    preset: str = doc(f"how the plan was made: one of {', '.join(PRESETS)}")
    device: Literal["gpu", "cpu"] = doc("what the plan was sized for")
    dataset: DatasetSection = doc("")
    intensity: IntensitySection = doc("")
    resampling: ResamplingSection = doc("")
    network: NetworkSection = doc("3D U-Net: 3x3x3 conv + norm + activation, max-pool down, up + concatenation skips, softmax")
    training: TrainingSection = doc("")
    inference: InferenceSection = doc("sliding-window prediction")
    cross_validation: CrossValidationSection = doc("")
    memory: MemorySection = doc("")

    def replace(self, **changes) -> "Plan":
        return dataclasses.replace(self, **changes)


def pool_divisor(network: NetworkSection) -> list[int]:
    """Total down-sampling per axis: the patch must be a multiple of it."""
    return [math.prod(p[a] for p in network.pool_sizes) for a in range(3)]


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
                r.error(f"dataset.label_groups.{g}", f"'{m}' is not one of the labels {list(ds.labels)}")
    if len(plan.intensity.normalization) != len(ds.channels):
        r.error("intensity.normalization", f"{len(plan.intensity.normalization)} entries for {len(ds.channels)} channels")
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
    _positive_list(r, "training.patch_size", tr.patch_size, 3, int)
    n_stages = len(net.filters)
    if n_stages < 1 or any(f <= 0 for f in net.filters):
        r.error("network.filters", "needs at least one stage, every count > 0")
    if len(net.pool_sizes) != n_stages - 1:
        r.error("network.pool_sizes", f"{len(net.pool_sizes)} entries; {n_stages} stages need {n_stages - 1}")
    if len(net.kernel_sizes) != n_stages:
        r.error("network.kernel_sizes", f"{len(net.kernel_sizes)} entries; {n_stages} stages need {n_stages}")
    for i, p in enumerate(net.pool_sizes):
        if len(p) != 3 or any(v not in (1, 2) for v in p):
            r.error(f"network.pool_sizes.{i}", f"{p}: each entry is 3 values of 1 or 2")
    for i, k in enumerate(net.kernel_sizes):
        if len(k) != 3 or any(v not in (1, 3, 5) for v in k):
            r.error(f"network.kernel_sizes.{i}", f"{k}: each entry is 3 values of 1, 3 or 5")
    if len(tr.patch_size) == 3 and all(len(p) == 3 for p in net.pool_sizes):
        div = pool_divisor(net)
        for a, (p, d) in enumerate(zip(tr.patch_size, div)):
            if d and p % d:
                r.error(f"training.patch_size.{a}", f"{p} is not divisible by the network's total pooling {d} on "
                                                    f"axis {'zyx'[a]}; use {max(d, round(p / d) * d)}")
    if net.convs_per_stage < 1:
        r.error("network.convs_per_stage", "must be >= 1")
    if tr.workers < 0:
        r.error("training.workers", f"{tr.workers} must be >= 0")
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
        if a not in (0, 1, 2):
            r.error(f"training.augmentation.mirror_axes.{i}", f"{a}: axes are 0, 1, 2")
    for f in dataclasses.fields(tr.augmentation):
        v = getattr(tr.augmentation, f.name)
        if isinstance(v, list) and f.name != "mirror_axes" and (len(v) != 2 or v[0] > v[1]):
            r.error(f"training.augmentation.{f.name}", f"{v}: expected [low, high] with low <= high")
    if tr.loss.tversky_alpha < 0 or tr.loss.tversky_beta < 0 or tr.loss.tversky_weight < 0 or tr.loss.cross_entropy_weight < 0:
        r.error("training.loss", "weights, alpha and beta must be >= 0")


def _check_folds(plan: Plan, base_dir: Path, r: Reader) -> None:
    """Refuse more folds than cases before any work (each fold must validate at least one case)."""
    from planner.dataset import DatasetError, load_dataset
    try:
        n = len(load_dataset(base_dir / plan.dataset.path, infer_plain=False).cases)
    except DatasetError as e:
        r.error("dataset.path", str(e))
        return
    if plan.cross_validation.folds > n:
        r.error("cross_validation.folds", f"{plan.cross_validation.folds} folds need at least as many cases; the "
                                          f"dataset has {n}: set folds to {n} or fewer")


def _positive_list(r: Reader, key: str, values: list, n: int, kind: type) -> None:
    if len(values) != n:
        r.error(key, f"expected {n} values (z, y, x), found {len(values)}")
    for i, v in enumerate(values):
        if v <= 0:
            r.error(f"{key}.{i}", f"{v} must be > 0")
