"""Estimate of the training memory of segplan's Keras U-Nets, 3D and 2D (no TensorFlow needed).

The shape of the model is analytic: counted per sample, for each stage at its resolution, every
convolution keeps its output, the batch-norm output and the activation output for the backward
pass (3 tensors of F channels; a leaky ReLU keeps its input too); the decoder adds the up-sampled
tensor (F) and the concatenation (2F); each output head (one per supervised level with deep
supervision) keeps its logits and softmax. nnU-Net's residual encoder counts the same way: per
block two convolutions with their norms, the sum and the activations, the skip's pooling and
projection. Weights cost 16 bytes per parameter (weights, gradients, Adam's two moments, float32).
The bytes each kept activation value costs are measured, not assumed: on a GPU, fitted by
benchmarks/memory_fit.py to the peak allocated memory of one training step per grid point on an
H200 under Keras 3.15 on PyTorch 2.11 (benchmarks/results/gpu_memory_torch.json; every point over
1 GB within 3% of the fit; the plain U-Net only: the residual encoder and deep supervision are
counted, not yet measured on a GPU). Mixed precision saves less than half: Keras keeps float32
copies beside the 16-bit activations. A fixed overhead covers the CUDA context and the framework's
runtime, which an allocator's peak does not count. Not calibrated on TensorFlow's GPU allocator
(no TensorFlow GPU was at hand). On a CPU: below.
"""
from __future__ import annotations

import math

from segplan.planner.plan import NetworkSection, input_channels, output_channels, supervised_levels

GPU_BYTES_PER_ACTIVATION = {False: 6.6, True: 4.8}   # float32 / mixed precision, fitted (see above)
OVERHEAD_GB = 0.8
# on a CPU (TensorFlow, peak resident memory of the training process; fitted by
# benchmarks/memory_calibration.py to benchmarks/results/cpu_memory.json, 29 points (24 3D, 5 2D
# networks of 2d plans), the median of 3 processes each, every one within 4.5%): bytes per kept
# activation value, and the process's fixed memory (the runtime, 0.88 GB with TensorFlow 2.21, plus
# what a step costs whatever its size). A 2D network counts as the 3D one a voxel deep.
CPU_BYTES_PER_ACTIVATION = {False: 3.66, True: 3.31}
CPU_PROCESS_GB = 0.92
# and what each convolution layer holds whatever the patch (TensorFlow's kernels and their caches;
# it tells nnU-Net's residual encoder, 2-3x the convolutions of the plain U-Net, from the plain one)
CPU_GB_PER_CONVOLUTION = 0.0062
# what a `segplan run` holds beyond one training step: the libraries of the runner (SimpleITK,
# batchgenerators, matplotlib), the validation and prediction graphs, batches in flight. Measured:
# the Hippocampus CPU plan's whole run peaked at 1.49 GB (PSS of the process tree) against 1.24 GB
# for its step + cache + prediction
CPU_RUN_OVERHEAD_GB = 0.25
GB = 1024 ** 3


def stage_shapes(patch: list[int], pool_sizes: list[list[int]]) -> list[list[int]]:
    shapes = [list(patch)]
    for p in pool_sizes:
        shapes.append([s // q for s, q in zip(shapes[-1], p)])
    return shapes


def _conv_params(c_in: int, f: int, kv: int) -> int:
    return c_in * f * kv + f + 4 * f  # kernel + bias + batch norm (4 vectors)


def _residual_encoder_parameters(net: NetworkSection, in_channels: int) -> int:
    """The stem convolution, then per block two convolutions and, where the channels change, a 1x1
    projection of the skip (runner/training/model.py)."""
    kv = [math.prod(k) for k in net.kernel_sizes]
    params, prev = _conv_params(in_channels, net.filters[0], kv[0]), net.filters[0]
    for s, (f, n) in enumerate(zip(net.filters, net.blocks_per_stage)):
        for b in range(n):
            c_in = prev if b == 0 else f
            params += _conv_params(c_in, f, kv[s]) + _conv_params(f, f, kv[s])
            if c_in != f:
                params += c_in * f + 4 * f
        prev = f
    return params


def count_parameters(net: NetworkSection, in_channels: int, n_classes: int) -> int:
    """Weights of the network (convolutions, biases, batch-norm vectors), every output head included."""
    filters, kernel_sizes, pool_sizes, convs = net.filters, net.kernel_sizes, net.pool_sizes, net.convs_per_stage
    if net.architecture == "residual_encoder":
        params = _residual_encoder_parameters(net, in_channels)
    else:
        params, prev = 0, in_channels
        for f, k in zip(filters, kernel_sizes):
            kv = math.prod(k)
            for i in range(convs):
                params += (prev if i == 0 else f) * f * kv + f + 4 * f  # conv + bias + BN (4 vectors)
            prev = f
    for s in range(len(filters) - 2, -1, -1):
        f = filters[s]
        params += filters[s + 1] * f * math.prod(pool_sizes[s]) + f          # transposed conv
        kv = math.prod(kernel_sizes[s])
        params += 2 * f * f * kv + f + 4 * f + (convs - 1) * (f * f * kv + 5 * f)
    return params + sum(filters[lv.stage] * n_classes + n_classes for lv in supervised_levels(net))


def _per_activation(net: NetworkSection) -> int:
    """Tensors an activation layer keeps: its output; a leaky ReLU also its input (its gradient needs
    the input, ReLU's only the output). Measured: a plain 64^3 U-Net of 16..256 filters takes 0.14 GB
    more with leaky ReLU, nnU-Net's residual encoder 0.20 GB less with ReLU (benchmarks/results/
    cpu_memory.json)."""
    return 2 if net.activation == "leaky_relu" else 1


def _residual_encoder_activations(net: NetworkSection, shapes: list[list[int]]) -> int:
    """Per sample: the stem (conv, norm, activation: 3F); per block its two convolutions (conv, norm,
    activation, then conv, norm: 5F), the sum and its activation (2F); the first block of a
    down-sampling stage adds its skip: the average-pooled input, and its projection with norm (2F)
    where the channels change."""
    act = _per_activation(net)
    total = (2 + act) * net.filters[0] * math.prod(shapes[0])
    prev = net.filters[0]
    for s, (f, n) in enumerate(zip(net.filters, net.blocks_per_stage)):
        v = math.prod(shapes[s])
        total += n * (5 + 2 * act) * f * v
        if s > 0:
            total += prev * v + (2 * f * v if prev != f else 0)
        prev = f
    return total


def activation_voxels(net: NetworkSection, patch: list[int], n_classes: int) -> int:
    """Float values kept for back-propagation, per sample."""
    filters, convs = net.filters, net.convs_per_stage
    conv = 2 + _per_activation(net)  # a convolution, its norm and its activation
    shapes = stage_shapes(patch, net.pool_sizes)
    last = len(filters) - 1
    total = _residual_encoder_activations(net, shapes) if net.architecture == "residual_encoder" else 0
    for s, (shape, f) in enumerate(zip(shapes, filters)):
        v = math.prod(shape)
        if net.architecture != "residual_encoder":
            total += v * (convs * conv * f + (f if s < last else 0))  # convs (+ pooled copy is 1/8, ~f)
        if s < last:
            total += v * (f + 2 * f + convs * conv * f)  # up-sampled, concatenated, decoder convs
    # each output head keeps its logits and softmax (deep supervision: one per supervised level)
    return total + sum(math.prod(shapes[lv.stage]) * 2 * n_classes for lv in supervised_levels(net))


def count_convolutions(net: NetworkSection) -> int:
    """Convolution layers of the network: encoder (plain: convs_per_stage per stage; residual: the
    stem, two per block and the skip projections), decoder (a transposed convolution and
    convs_per_stage per stage), output heads."""
    n = len(net.filters)
    decoder = (n - 1) * (1 + net.convs_per_stage) + len(supervised_levels(net))
    if net.architecture == "residual_encoder":
        projections = sum(net.filters[s] != net.filters[s - 1] for s in range(1, n))
        return 1 + 2 * sum(net.blocks_per_stage) + projections + decoder
    return n * net.convs_per_stage + decoder


def estimate_training_gb(net: NetworkSection, patch: list[int], batch: int, in_channels: int, n_classes: int,
                         mixed_precision: bool = False, device: str = "gpu") -> float:
    """Estimated memory in GiB for one training step of (network, patch, batch): GPU memory, or on
    ``device="cpu"`` the peak resident memory of a process that trains it."""
    act = activation_voxels(net, patch, n_classes) * batch
    weights = 16 * count_parameters(net, in_channels, n_classes)
    if device == "cpu":
        return ((act * CPU_BYTES_PER_ACTIVATION[bool(mixed_precision)] + weights) / GB + CPU_PROCESS_GB
                + CPU_GB_PER_CONVOLUTION * count_convolutions(net))
    return (act * GPU_BYTES_PER_ACTIVATION[bool(mixed_precision)] + weights) / GB + OVERHEAD_GB


def estimate_for_plan(plan) -> float:
    """The training-step estimate for a Plan's network, patch, batch and precision (GiB): GPU memory
    for a GPU plan, the training process's resident memory for a CPU plan. A cascade's network
    counts its extra input channels (segplan.planner.plan.input_channels)."""
    tr = plan.training
    return estimate_training_gb(plan.network, tr.patch_size, tr.batch_size, input_channels(plan),
                                output_channels(plan.dataset), tr.mixed_precision, device=plan.device)


def estimate_cpu_run_gb(plan, dataset_voxels: float, largest_voxels: float, largest_original_voxels: float
                        ) -> tuple[float, dict[str, float]]:
    """Peak resident memory of a whole `segplan run` of a CPU plan (GiB) and its parts: the training
    process (model, step, runtime, the runner's own overhead), the preprocessed cache it reads (memory-mapped float32 images
    and int8 labels, every training case touched), and the prediction of the largest case (class
    probabilities and their weights at the target spacing, then back on the original grid)."""
    k, c = output_channels(plan.dataset), len(plan.dataset.channels)
    parts = {"training": estimate_for_plan(plan) + CPU_RUN_OVERHEAD_GB,
             "cache": dataset_voxels * (4 * c + 1) / GB,
             "prediction": (largest_voxels * (k + 1 + c) + largest_original_voxels * (k + c)) * 4 / GB}
    return sum(parts.values()), parts
