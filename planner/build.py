"""Fingerprint -> Plan, for each preset; the reasons for each value become YAML comments."""
from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess

import numpy as np

from segplan.planner import heuristics as H
from segplan.planner.augmentation import MIRROR_TTA_MIN_P, MIRROR_TTA_WHY, mirror_axes
from segplan.planner.configurations import size
from segplan.planner.fingerprint import Fingerprint
from segplan.planner.dataset_rules import label_groups, label_handling, with_orientation, with_region_prior
from segplan.planner.orientation import in_majority_orientation
from segplan.planner.plan import (
    SCHEMA_VERSION, AugmentationSection, ChannelNormalization, CrossValidationSection, DatasetSection,
    InferenceSection, IntensitySection, LossSection, MemorySection, NetworkSection, Plan, ResamplingSection,
    SamplingSection, ScheduleSection, TrainingSection, network_inputs, supervised_levels)
from segplan.planner.memory import estimate_training_gb

CONVS_PER_STAGE = 2
# the default GPU plan's network: the paper's plain U-Net, trained with deep supervision as nnU-Net
DEFAULT_NETWORK = dataclasses.replace(H.PLAIN_NETWORK, deep_supervision=True)
# nnU-Net's ResEnc presets (residual_encoder_unet_planners.py): the GPU memory each is planned for
# by default, the batch not capped at 5% of the dataset (max_dataset_covered = 1), features capped
# at 320 (UNet_max_features_3d); the network: heuristics.RESENC_NETWORK
RESENC_PRESETS = {"resenc-m": 8.0, "resenc-l": 24.0}
RESENC_MAX_FILTERS = 320
MAX_BATCH_WORKERS = 8
DEFAULT_FOLDS = 5
PAPER_AUGMENTATION = AugmentationSection(
    mirror_p=0.15, mirror_axes=[0, 1, 2], elastic_p=0.15, elastic_alpha=[0.0, 900.0], elastic_sigma=[9.0, 13.0],
    rotation_p=0.15, rotation_degrees=15.0, scaling_p=0.15, scaling_range=[0.85, 1.25], brightness_p=0.15,
    brightness_range=[0.5, 2.0], contrast_p=0.15, contrast_range=[0.3, 3.0], gamma_p=0.15, gamma_range=[0.7, 1.5],
    noise_p=0.15, noise_variance=[0.0, 0.05])
PAPER_LOSS = LossSection(tversky_alpha=0.5, tversky_beta=0.5, tversky_weight=1.0, cross_entropy_weight=1.0, smooth=1e-6)
PAPER_SCHEDULE = ScheduleSection(max_epochs=1000, iterations_per_epoch=150, monitor="train_loss", plateau_factor=0.1,
                                 plateau_patience=15, plateau_min_delta=1e-4, plateau_cooldown=1, min_learning_rate=1e-5,
                                 early_stopping_patience=100, validation_patches=8, time_budget_minutes=None)


def gpu_present() -> bool:
    """Whether nvidia-smi lists a GPU (the planner does not import TensorFlow to find out)."""
    if not shutil.which("nvidia-smi"):
        return False
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (subprocess.SubprocessError, OSError):
        return False
    return "GPU" in out


def gpu_memory_budget(requested: float | None, preset: str = "default") -> tuple[float, str]:
    """(GB, where it came from): the flag, else a ResEnc preset's own target (8 / 24 GB, as nnU-Net),
    else the first GPU's memory from nvidia-smi, else 8."""
    if requested is not None:
        return float(requested), "--gpu-memory"
    if preset in RESENC_PRESETS:
        return RESENC_PRESETS[preset], (f"the {preset} preset's target, as nnU-Net's ResEnc {preset[-1].upper()} "
                                        "planner (--gpu-memory overrides it)")
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout
            return round(float(out.splitlines()[0]) / 1024, 1), "nvidia-smi, first GPU"
        except (subprocess.SubprocessError, ValueError, IndexError):
            pass  # unreadable nvidia-smi: fall back to the default and say so
    return 8.0, "default 8 GB (no GPU found)"


def make_plan(fp: Fingerprint, name: str, dataset_rel: str, work_rel: str, gpu_memory_gb: float,
              budget_source: str, preset: str = "default", splits_file: str | None = None,
              first: int = H.FIRST_FILTERS, cap: int = H.MAX_FILTERS, configuration: str = "3d_fullres",
              min_cover: float | None = None) -> tuple[Plan, dict]:
    """The GPU plan for ``fp`` (presets default, miscnn-covid19, resenc-m and resenc-l) and the reasons
    behind its values, for one of nnU-Net's configurations (planner/configurations.py; a cascade's
    previous_stage is the caller's to set). The cpu preset starts from this plan with its own rules:
    segplan.planner.cpu_plan, which passes ``min_cover`` (heuristics.fit_patch_and_batch)."""
    if preset == "miscnn-covid19":
        if configuration != "3d_fullres":
            raise ValueError(f"the miscnn-covid19 preset is the paper's 3D network at full resolution, not "
                             f"'{configuration}'")
        return _miscnn(fp, name, dataset_rel, work_rel, gpu_memory_gb, budget_source, splits_file)
    stored, fp = fp, in_majority_orientation(fp)   # spacings, shapes, directions as the network sees them
    if preset != "default" and preset not in RESENC_PRESETS:
        raise ValueError(f"make_plan makes the default, miscnn-covid19 and {', '.join(RESENC_PRESETS)} presets, not "
                         f"'{preset}' (segplan.planner.cpu_plan.make_cpu_plan makes cpu plans)")
    reasons: dict[str, str] = {}
    resenc = preset in RESENC_PRESETS
    n_cls = len(fp.regions) or len(fp.labels)
    n_in = network_inputs(configuration, len(fp.channel_names), len(fp.labels))

    def fit_at(spacing: list[float], median: list[float], voxels: float) -> dict:
        return H.fit_patch_and_batch(median, spacing, gpu_memory_gb, n_in, n_cls, voxels, reasons, first=first,
                                     cap=min(cap, RESENC_MAX_FILTERS) if resenc else cap,
                                     network=H.RESENC_NETWORK if resenc else DEFAULT_NETWORK,
                                     max_batch_share=1.0 if resenc else H.MAX_BATCH_SHARE, min_cover=min_cover)
    spacing, slice_axis, fit = size(configuration, fp, H.target_spacing(np.array([c.spacing for c in fp.cases]),
                                                                        reasons), fit_at, reasons)
    _network_reasons(fit["network"], preset, reasons)
    norms = []
    _channel_sources(fp, reasons)
    for i, st in enumerate(fp.channels):
        if st.is_ct:
            norms.append(ChannelNormalization(**H.ct_normalization(st, reasons, i)))
        else:
            reasons[f"intensity.normalization.{i}.scheme"] = ("not a CT channel: z-score per case over the non-zero "
                                                              "region (nnU-Net's default for MRI)")
            norms.append(ChannelNormalization(st.name, "zscore", None, "case", 0.0, 1.0))
    groups = label_groups(fp.labels)
    reasons["training.schedule.monitor"] = ("nothing is chosen on the validation cases: they are the cross-validation's "
                                            "test cases")
    reasons["training.sampling.foreground_oversampling"] = "nnU-Net's 1/3 of patches centred on foreground"
    reasons["inference.mirroring"] = MIRROR_TTA_WHY
    # mirrored along every axis of the patch (a 2d plan's two) but a left-right one that would swap
    # left and right labels; a 2d plan predicts a batch of slices per call
    augmentation = dataclasses.replace(PAPER_AUGMENTATION, mirror_axes=mirror_axes(fp, slice_axis, reasons))
    window_batch = 2 if slice_axis is None else fit["batch"]
    if slice_axis is not None:
        reasons["inference.batch_size"] = "slices per network call: the training batch (a slice is one window)"
    plan = Plan(
        schema_version=SCHEMA_VERSION, name=name, preset=preset, device="gpu", configuration=configuration,
        slice_axis=slice_axis,
        dataset=with_orientation(stored, label_handling(fp, DatasetSection(
            dataset_rel, work_rel, list(fp.channel_names), dict(fp.labels), groups, splits_file), reasons), reasons),
        intensity=IntensitySection(list(fp.windowed_range), _conventions(fp, reasons), norms),
        resampling=ResamplingSection(spacing, 3, "onehot_linear", 3.0, 0),
        network=fit["network"],
        training=TrainingSection(fit["patch"], fit["batch"], 1e-3, False, 12345, SamplingSection(0.33),
                                 augmentation, PAPER_LOSS, PAPER_SCHEDULE, batch_workers(reasons)),
        inference=InferenceSection(0.5, "gaussian", augmentation.mirror_p >= MIRROR_TTA_MIN_P, window_batch),
        cross_validation=CrossValidationSection(_folds(fp, reasons), 12345),
        memory=MemorySection(gpu_memory_gb, budget_source, round(fit["estimate"], 2)))
    return with_region_prior(plan, fp), reasons


def supervision_note(net: NetworkSection) -> str:
    """The outputs that carry loss and their weights, in words (for a plan's comments)."""
    levels = supervised_levels(net)
    if len(levels) == 1:
        return "the full-resolution output alone carries loss"
    where = ["full resolution" if lv.stage == 0 else f"stage {lv.stage} (1/{max(lv.factors)})" for lv in levels]
    parts = ", ".join(f"{lv.weight:.3f} at {w}" for lv, w in zip(levels, where))
    return f"loss weights {parts}; the lowest decoder stage is left out (weight 0, nnU-Net's rule)"


def _network_reasons(net: NetworkSection, preset: str, reasons: dict) -> None:
    if preset in RESENC_PRESETS:
        reasons["network.architecture"] = (f"the {preset} preset: nnU-Net's residual-encoder U-Net (\"nnU-Net "
                                           "Revisited\", Isensee et al. 2024)")
        reasons["network.blocks_per_stage"] = "nnU-Net's ResEnc presets: (1, 3, 4, 6, 6, 6, ...) cut to the stages"
        reasons["network.convs_per_stage"] = "one convolution per decoder stage, as nnU-Net's ResEnc presets"
        reasons["network.activation"] = "leaky ReLU (slope 0.01), as nnU-Net"
        reasons["network.filters"] = f"{net.filters[0]} doubling per stage, capped at {RESENC_MAX_FILTERS} as nnU-Net"
        reasons["training.batch_size"] += "; not capped at 5% of the dataset, as nnU-Net's ResEnc presets"
        why = "on, as nnU-Net's ResEnc presets"
    else:
        why = "on, as nnU-Net's default plans"
    reasons["network.deep_supervision"] = f"{why}: {supervision_note(net)}"


def batch_workers(reasons: dict) -> int:
    """All but one of this machine's cores make batches (the last one feeds the accelerator), at most 8."""
    cores = os.cpu_count() or 2
    reasons["training.workers"] = f"{cores} CPU cores on the planning machine: all but one, at most {MAX_BATCH_WORKERS}"
    return max(1, min(MAX_BATCH_WORKERS, cores - 1))


def _folds(fp: Fingerprint, reasons: dict) -> int:
    """nnU-Net's 5 folds, fewer where the dataset has fewer cases (each fold validates >= 1 case)."""
    n = len(fp.cases)
    if n < 2:
        raise ValueError(f"the dataset has {n} case(s): cross-validation needs at least 2")
    if n < DEFAULT_FOLDS:
        reasons["cross_validation.folds"] = (f"only {n} cases: {n} folds of one validation case each "
                                             f"instead of {DEFAULT_FOLDS}")
    return min(DEFAULT_FOLDS, n)


def _channel_sources(fp: Fingerprint, reasons: dict) -> None:
    """The plan says of each channel whether it was taken for CT and from what (its declared name, or
    what segplan saw in the files of a plain layout)."""
    said = [f"{st.name}: {st.source}" for st in fp.channels if st.source]
    if said:
        reasons["dataset.channels"] = "; ".join(said)


def _conventions(fp: Fingerprint, reasons: dict) -> dict[str, str]:
    """Per CT case its detected unit; an 'unknown' case is assumed HU, and the plan says so beside it."""
    out = {}
    for c in fp.cases:
        if not c.conventions or c.conventions[0] == "other":
            continue
        conv = c.conventions[0]
        if conv == "unknown":
            conv = "hu"
            reasons[f"intensity.conventions.{c.case_id}"] = ("ASSUMED: its values show no known unit (no air below "
                                                              "-500 HU, not the 0..255 windowed look, not HU + 1024; "
                                                              "see `segplan check-dataset`); check the case and edit")
        out[c.case_id] = conv
    if out:
        reasons["intensity.conventions"] = ("detected per case by evidence: 'hu' (air below -500), 'windowed' (whole "
                                            "numbers 0..255, air near 0, window top reached), 'shifted_hu' (HU + 1024); "
                                            "for these training cases only: an image given to predict is judged by "
                                            "its own values, whatever its name")
    return out


def _miscnn(fp, name, dataset_rel, work_rel, gpu_memory_gb, budget_source, splits_file) -> tuple[Plan, dict]:
    """The MIScnn COVID-19 configuration, field for field (shared/PAPER.md)."""
    reasons = {"resampling.target_spacing": "the paper: 1.58 x 1.58 x 2.70 mm (x, y, z)",
               "training.patch_size": "the paper: 160 x 160 x 80 (x, y, z)", "training.batch_size": "the paper",
               "intensity.normalization.0.clip": "the paper: [-1250, 250] HU; windowed cases are mapped into HU first, so they are not clipped twice",
               "intensity.normalization.0.zscore": "the paper: z-score per case (after grayscale scaling, which z-score makes redundant)",
               "training.sampling.foreground_oversampling": "the paper: plain random crops",
               "network.deep_supervision": "off: the paper's network has one output and one loss"}
    network = NetworkSection([32, 64, 128, 256, 512], [[2, 2, 2]] * 4, [[3, 3, 3]] * 5, CONVS_PER_STAGE, "batch",
                             0.99, "relu", "transpose", "plain", [], False)
    n_in, n_cls = len(fp.channel_names), len(fp.labels)
    _channel_sources(fp, reasons)
    est = estimate_training_gb(network, [80, 160, 160], 2, n_in, n_cls)
    norms = [ChannelNormalization(n, "ct", [-1250.0, 250.0], "case", 0.0, 1.0) for n in fp.channel_names]
    plan = Plan(
        schema_version=SCHEMA_VERSION, name=name, preset="miscnn-covid19", device="gpu",
        dataset=with_orientation(fp, label_handling(fp, DatasetSection(
            dataset_rel, work_rel, list(fp.channel_names), dict(fp.labels), label_groups(fp.labels), splits_file),
            reasons), reasons),
        intensity=IntensitySection([-1250.0, 250.0], _conventions(fp, reasons), norms),
        resampling=ResamplingSection([2.70, 1.58, 1.58], 3, "onehot_linear", 3.0, 3),
        network=network,
        training=TrainingSection([80, 160, 160], 2, 1e-3, False, 12345, SamplingSection(0.0), PAPER_AUGMENTATION,
                                 PAPER_LOSS, PAPER_SCHEDULE, batch_workers(reasons)),
        inference=InferenceSection(0.5, "constant", False, 1),
        cross_validation=CrossValidationSection(_folds(fp, reasons), 12345),
        memory=MemorySection(gpu_memory_gb, budget_source, round(est, 2)))
    if est > gpu_memory_gb:
        reasons["memory.estimate_gb"] = (f"DOES NOT FIT: the paper's configuration needs {est:.2f} GB of the "
                                         f"{gpu_memory_gb:g} GB budget; lower training.batch_size or patch_size")
    return with_region_prior(plan, fp), reasons
