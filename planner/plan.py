"""The plan: every hyper-parameter the runner uses, as frozen dataclasses (read and written as
commented YAML by planner/plan_file.py).

Axis order everywhere in the plan is (z, y, x). Paths are relative to the plan file.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from segplan.planner.schema import doc

SCHEMA_VERSION = 1
PRESETS = ("default", "miscnn-covid19", "cpu", "resenc-m", "resenc-l")
PLAN_CONVENTIONS = ("hu", "windowed", "shifted_hu", "other")
CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres")


@dataclass(frozen=True)
class DatasetSection:
    path: str = doc("dataset folder, relative to this plan file")
    work_dir: str = doc("where preprocessed data, folds and reports go, relative to this plan file")
    channels: list[str] = doc("input channels, in file order (_0000, _0001, ...)")
    labels: dict[str, int] = doc("class name -> value in the label files; the order is the network's class order")
    label_groups: dict[str, list[str]] = doc("extra classes for evaluation, the union of these labels (the paper's lungs = left + right)")
    splits_file: str | None = doc("a split given with the dataset (nnU-Net splits_final.json), used instead of a new one; null: none")
    regions: dict[str, list[int]] = doc(
        "region-based training (nnU-Net): region name -> the label values it unites, foreground only, regions may "
        "overlap (BraTS: whole tumour [1, 2, 3], tumour core [2, 3], enhancing tumour [3]); the network has one "
        "sigmoid output per region and is evaluated per region. {}: one softmax output per label",
        default_factory=dict)
    regions_class_order: list[int] = doc(
        "with regions: the label value written where each region is predicted (probability > 0.5), in the order of "
        "dataset.regions, later regions overwriting earlier ones (nnU-Net's regions_class_order); []: no regions",
        default_factory=list)
    ignore_label: int | None = doc(
        "label value of voxels nobody annotated (nnU-Net's 'ignore'); not one of dataset.labels, no output: left out "
        "of the loss, of patch centres and of the evaluation; predictions stay dense. null: every voxel is annotated",
        default=None)
    orientation: str | None = doc(
        "the orientation every image is brought to before preprocessing (SimpleITK's three letters, e.g. LPS: the "
        "first index axis towards the patient's left, then posterior, then superior), by axis permutation and flips "
        "only (no interpolation; an oblique image keeps its tilt); predictions are put back in the input's own "
        "orientation and geometry. The planner writes the training cases' majority. null: images are used as stored",
        default=None)


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
    conventions: dict[str, str] = doc("per CT training case: 'hu', 'windowed' (0..255 from windowed_range) or 'shifted_hu' (HU + 1024), as detected; edit to override. Used for these training cases only (not written into bundles): new images are judged by their own values")
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
    pool_sizes: list[list[int]] = doc("down-sampling (z, y, x) after each stage but the last: max-pooling (plain) or "
                                      "the stride of the next stage's first residual block (residual_encoder); a 2d "
                                      "plan: its two in-plane axes")
    kernel_sizes: list[list[int]] = doc("convolution kernel (z, y, x) per stage (1 along an axis much coarser than the "
                                        "others); a 2d plan: its two in-plane axes")
    convs_per_stage: int = doc("convolutions per stage (residual_encoder: per decoder stage; the encoder's are in "
                               "blocks_per_stage)")
    normalization: Literal["batch", "instance", "none"] = doc(
        "after each convolution: batch (the paper), instance (nnU-Net: each image's own statistics, the same in "
        "training and inference, whatever the batch size) or none")
    batchnorm_momentum: float = doc("Keras BatchNormalization momentum")
    activation: Literal["relu", "leaky_relu"] = doc("after each convolution")
    upsampling: Literal["transpose", "upsample"] = doc("transposed convolution (paper) or nearest upsampling + conv")
    architecture: Literal["plain", "residual_encoder"] = doc(
        "plain: convs_per_stage convolutions per stage, max-pooling (the paper); residual_encoder: nnU-Net's ResEnc "
        "U-Net, an encoder of residual blocks (blocks_per_stage) with strided down-sampling, a plain decoder",
        default="plain")
    blocks_per_stage: list[int] = doc("residual_encoder: residual blocks (two convolutions each) per encoder stage, "
                                      "first stage first; plain: empty", default_factory=list)
    deep_supervision: bool = doc(
        "also train on the decoder's lower resolutions (nnU-Net): one more output per decoder stage but the lowest, "
        "each against the labels down-sampled to it, loss weights 1/2^k normalised; only the full-resolution "
        "output predicts", default=False)


@dataclass(frozen=True)
class SamplingSection:
    foreground_oversampling: float = doc("share of patches centred on a random foreground voxel (0: plain random crops, as the paper)")


@dataclass(frozen=True)
class AugmentationSection:
    mirror_p: float = doc("probability per sample; each axis in mirror_axes flipped with p 0.5 when applied")
    mirror_axes: list[int] = doc("axes of the patch (0 z, 1 y, 2 x; a 2d plan: 0 and 1, its in-plane axes)")
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
    cross_entropy_weight: float = doc("weight of the cross-entropy term (categorical; binary per region with "
                                      "dataset.regions)")
    smooth: float = doc("added to numerator and denominator")
    batch_dice: bool = doc("sum the Tversky index over the whole batch as one volume (nnU-Net's batch_dice), not per "
                           "patch: a patch with little or none of a class then adds no noisy term of its own",
                           default=False)


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
    validation_every: int = doc("score the validation patches every this many epochs (and after the last); 1 with "
                                "monitor: val_loss", default=1)


@dataclass(frozen=True)
class TrainingSection:
    patch_size: list[int] = doc("voxels (z, y, x); a 2d plan: the two in-plane axes, in that order without slice_axis "
                                "((y, x) when slice_axis is 0)")
    batch_size: int = doc("patches per step")
    learning_rate: float = doc("the optimizer's initial learning rate")
    mixed_precision: bool = doc("float16/bfloat16 activations (GPU); off on CPU")
    seed: int = doc("seeds sampling and augmentation")
    sampling: SamplingSection = doc("")
    augmentation: AugmentationSection = doc("batchgenerators transforms, applied on the fly")
    loss: LossSection = doc("multi-class Tversky + categorical cross-entropy (softmax); with dataset.regions, Tversky "
                            "per region + binary cross-entropy (sigmoid); with dataset.ignore_label, both on the "
                            "annotated voxels only")
    schedule: ScheduleSection = doc("")
    workers: int = doc("processes that make augmented batches ahead of the training step (0: one thread of the "
                       "training process); the batches are the same whatever the number", default=1)
    initial_weights: str | None = doc("Keras weights to start from (relative to this file; layers whose shape "
                                      "differs, e.g. another class count, start from scratch); null: random", default=None)
    optimizer: Literal["adam", "sgd"] = doc("adam (the paper) or sgd: SGD with Nesterov momentum 0.99 and gradients "
                                            "clipped to norm 12 (nnU-Net's; it starts at learning_rate 0.01)",
                                            default="adam")
    output_bias: list[float] = doc(
        "the starting bias of each output's logit, one per network output (every head of deep supervision); the "
        "planner gives a region plan's sigmoids the log-odds of each region's share of the training voxels, so that "
        "training starts from the prior instead of p = 0.5 everywhere; []: 0 (Keras' default)",
        default_factory=list)


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
    engine: Literal["keras", "onnxruntime", "openvino"] = doc(
        "what runs the network at prediction: keras (its backend), or the network exported to ONNX once per fold "
        "(kept in the work folder) run by onnxruntime or openvino (pip install 'segplan[cpu]'), faster per window on "
        "a CPU; the CPU planner measures the installed ones and picks the fastest", default="keras")


@dataclass(frozen=True)
class CrossValidationSection:
    folds: int = doc("number of folds")
    seed: int = doc("seeds the split")


@dataclass(frozen=True)
class MemorySection:
    gpu_memory_gb: float = doc("budget the patch and batch were fitted to")
    budget_source: str = doc("where the budget came from")
    estimate_gb: float = doc("planner/memory.py's estimate: GPU memory of a training step (GPU plans); the peak "
                             "system memory of the whole `segplan run` (CPU plans)")
    measured_gb: float | None = doc("peak GPU memory of one training step at this patch and batch, measured by "
                                    "`segplan plan --probe` (null: not measured)", default=None)


@dataclass(frozen=True, kw_only=True)
class Plan:
    schema_version: int = doc("plan format version")
    name: str = doc("plan name")
    preset: str = doc(f"how the plan was made: one of {', '.join(PRESETS)}")
    device: Literal["gpu", "cpu"] = doc("what the plan was sized for")
    configuration: Literal["2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres"] = doc(
        "nnU-Net's configuration family: 2d (slices), 3d_fullres (the target spacing), 3d_lowres (a coarser "
        "spacing, for images the full-resolution patch covers too little of), 3d_cascade_fullres (full resolution "
        "with the 3d_lowres prediction as extra input channels)", default="3d_fullres")
    previous_stage: str | None = doc("3d_cascade_fullres only: the 3d_lowres plan file whose out-of-fold predictions "
                                     "are extra input channels (relative to this file); null otherwise", default=None)
    slice_axis: int | None = doc("2d only: the axis (0 z, 1 y, 2 x) the volume is cut along; the network sees the "
                                 "other two, in (z, y, x) order, one slice at a time; null otherwise", default=None)
    dataset: DatasetSection = doc("")
    intensity: IntensitySection = doc("")
    resampling: ResamplingSection = doc("")
    network: NetworkSection = doc("U-Net (3D; 2D for a 2d plan): conv + norm + activation blocks (plain) or residual "
                                  "blocks (residual_encoder) down, up + concatenation skips, softmax (one sigmoid per "
                                  "region with dataset.regions)")
    training: TrainingSection = doc("")
    inference: InferenceSection = doc("sliding-window prediction")
    cross_validation: CrossValidationSection = doc("")
    memory: MemorySection = doc("")

    def replace(self, **changes) -> "Plan":
        return dataclasses.replace(self, **changes)


def spatial_dims(network: NetworkSection) -> int:
    """Spatial axes the network works on: 2 (a 2d plan's slices) or 3, as its kernels say."""
    return len(network.kernel_sizes[0]) if network.kernel_sizes else 3


def pool_divisor(network: NetworkSection) -> list[int]:
    """Total down-sampling per axis: the patch must be a multiple of it."""
    dims = len(network.pool_sizes[0]) if network.pool_sizes else spatial_dims(network)
    return [math.prod(p[a] for p in network.pool_sizes) for a in range(dims)]


def volume_patch(patch: list[int], slice_axis: int | None) -> list[int]:
    """The window a patch takes from a (z, y, x) volume: the patch itself, or for a 2d plan the patch
    with one voxel along ``slice_axis`` (a slice). Sampling and tiling cut these windows and reshape
    them to the patch for the network: the one place where a 2d plan differs from a 3d one."""
    if slice_axis is None:
        return list(patch)
    return [*patch[:slice_axis], 1, *patch[slice_axis:]]


def patch_axes(plan: "Plan") -> str:
    """Names of the patch's axes, in order: 'zyx', or a 2d plan's in-plane two (e.g. 'yx')."""
    return "".join(a for i, a in enumerate("zyx") if i != plan.slice_axis)


def cascade_channels(n_classes: int) -> int:
    """Extra input channels of a 3d_cascade_fullres network: the previous stage's prediction one-hot,
    one channel per foreground class (nnU-Net's determine_num_input_channels: its foreground labels)."""
    return n_classes - 1


def network_inputs(configuration: str, n_channels: int, n_classes: int) -> int:
    """Input channels of a configuration's network: the image channels, and for 3d_cascade_fullres
    the previous stage's one-hot prediction (``cascade_channels``) after them."""
    return n_channels + (cascade_channels(n_classes) if configuration == "3d_cascade_fullres" else 0)


def input_channels(plan: "Plan") -> int:
    """Input channels of the plan's network (``network_inputs``)."""
    return network_inputs(plan.configuration, len(plan.dataset.channels), len(plan.dataset.labels))


@dataclass(frozen=True)
class SupervisedLevel:
    """One output the network trains with: its decoder stage (0: full resolution), the factor per
    axis of the patch (z, y, x; a 2d plan's two in-plane axes) by which its resolution is below the patch, and its weight in the loss."""
    stage: int
    factors: list[int]
    weight: float


def output_channels(ds: DatasetSection) -> int:
    """The network's outputs: one sigmoid per region for a region plan, else one softmax channel per label."""
    from segplan.planner.labels import label_model
    return label_model(ds).n_outputs


def supervised_levels(network: NetworkSection) -> list[SupervisedLevel]:
    """The outputs that carry loss, full resolution first: only that one without deep supervision.

    With it, nnU-Net's rule (nnUNetTrainer._get_deep_supervision_scales and _build_loss): an output
    per decoder stage (every stage but the bottleneck), weight 1/2^k at stage k, the lowest-resolution
    one weighted 0, the weights normalised to sum 1. A zero-weight output trains nothing, so it is not
    built; a network of 3 stages or fewer is thus left with its full-resolution output alone."""
    n_decoder = max(len(network.filters) - 1, 1)
    raw = [1.0 / 2 ** k for k in range(n_decoder)] if network.deep_supervision else [1.0]
    if len(raw) > 1:
        raw[-1] = 0.0
    total = sum(raw)
    levels, factors = [], [1] * spatial_dims(network)
    for k, w in enumerate(raw):
        if w > 0:
            levels.append(SupervisedLevel(k, list(factors), w / total))
        if k < len(network.pool_sizes):
            factors = [f * p for f, p in zip(factors, network.pool_sizes[k])]
    return levels
