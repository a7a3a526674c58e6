"""Estimate of the GPU training memory of segplan's Keras 3D U-Net (no TensorFlow needed).

The shape of the model is analytic: counted per sample, for each stage at its resolution, every
convolution keeps its output, the batch-norm output and the activation output for the backward
pass (3 tensors of F channels); the decoder adds the up-sampled tensor (F) and the concatenation
(2F); the head keeps the logits and softmax. Weights cost 16 bytes per parameter (weights,
gradients, Adam's two moments, float32). The bytes each kept activation value costs are measured,
not assumed: fitted by benchmarks/memory_fit.py to the peak allocated memory of one training step
per grid point on an H200 under Keras 3.15 on PyTorch 2.11 (benchmarks/results/
gpu_memory_torch.json; every point over 1 GB within 3% of the fit). Mixed precision saves less
than half: Keras keeps float32 copies beside the 16-bit activations. A fixed overhead covers the
CUDA context and the framework's runtime, which an allocator's peak does not count. Not calibrated
on TensorFlow's GPU allocator (no TensorFlow GPU was at hand) nor for CPU plans.
"""
from __future__ import annotations

import math

GPU_BYTES_PER_ACTIVATION = {False: 6.6, True: 4.8}   # float32 / mixed precision, fitted (see above)
OVERHEAD_GB = 0.8
# on a CPU (TensorFlow, peak resident memory of the training process; fitted by
# benchmarks/memory_calibration.py to benchmarks/results/cpu_memory.json: 12 points, all within 5%):
# bytes per kept activation value, and the process's fixed memory (the runtime, ~0.75 GB, plus
# what a step costs whatever its size)
CPU_BYTES_PER_ACTIVATION = {False: 3.61, True: 3.41}
CPU_PROCESS_GB = 0.93
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


def count_parameters(filters: list[int], kernel_sizes: list[list[int]], pool_sizes: list[list[int]],
                     convs_per_stage: int, in_channels: int, n_classes: int) -> int:
    params, prev = 0, in_channels
    for f, k in zip(filters, kernel_sizes):
        kv = math.prod(k)
        for i in range(convs_per_stage):
            params += (prev if i == 0 else f) * f * kv + f + 4 * f  # conv + bias + BN (4 vectors)
        prev = f
    for s in range(len(filters) - 2, -1, -1):
        f = filters[s]
        params += filters[s + 1] * f * math.prod(pool_sizes[s]) + f          # transposed conv
        kv = math.prod(kernel_sizes[s])
        params += 2 * f * f * kv + f + 4 * f + (convs_per_stage - 1) * (f * f * kv + 5 * f)
    return params + filters[0] * n_classes + n_classes


def activation_voxels(patch: list[int], filters: list[int], pool_sizes: list[list[int]], convs_per_stage: int,
                      n_classes: int) -> int:
    """Float values kept for back-propagation, per sample."""
    total = 0
    shapes = stage_shapes(patch, pool_sizes)
    last = len(filters) - 1
    for s, (shape, f) in enumerate(zip(shapes, filters)):
        v = math.prod(shape)
        enc = convs_per_stage * 3 * f + (f if s < last else 0)  # convs (+ pooled copy is 1/8, ~f)
        dec = (f + 2 * f + convs_per_stage * 3 * f) if s < last else 0
        total += v * (enc + dec)
    return total + math.prod(patch) * 2 * n_classes


def estimate_training_gb(patch: list[int], batch: int, filters: list[int], kernel_sizes: list[list[int]],
                         pool_sizes: list[list[int]], convs_per_stage: int, in_channels: int, n_classes: int,
                         mixed_precision: bool = False, device: str = "gpu") -> float:
    """Estimated memory in GiB for one training step of (network, patch, batch): GPU memory, or on
    ``device="cpu"`` the peak resident memory of a process that trains it."""
    act = activation_voxels(patch, filters, pool_sizes, convs_per_stage, n_classes) * batch
    weights = 16 * count_parameters(filters, kernel_sizes, pool_sizes, convs_per_stage, in_channels, n_classes)
    if device == "cpu":
        return (act * CPU_BYTES_PER_ACTIVATION[bool(mixed_precision)] + weights) / GB + CPU_PROCESS_GB
    return (act * GPU_BYTES_PER_ACTIVATION[bool(mixed_precision)] + weights) / GB + OVERHEAD_GB


def estimate_for_plan(plan) -> float:
    """The training-step estimate for a Plan's network, patch, batch and precision (GiB): GPU memory
    for a GPU plan, the training process's resident memory for a CPU plan."""
    net, tr = plan.network, plan.training
    return estimate_training_gb(tr.patch_size, tr.batch_size, net.filters, net.kernel_sizes, net.pool_sizes,
                                net.convs_per_stage, len(plan.dataset.channels), len(plan.dataset.labels),
                                tr.mixed_precision, device=plan.device)


def estimate_cpu_run_gb(plan, dataset_voxels: float, largest_voxels: float, largest_original_voxels: float
                        ) -> tuple[float, dict[str, float]]:
    """Peak resident memory of a whole `segplan run` of a CPU plan (GiB) and its parts: the training
    process (model, step, runtime, the runner's own overhead), the preprocessed cache it reads (memory-mapped float32 images
    and int8 labels, every training case touched), and the prediction of the largest case (class
    probabilities and their weights at the target spacing, then back on the original grid)."""
    k, c = len(plan.dataset.labels), len(plan.dataset.channels)
    parts = {"training": estimate_for_plan(plan) + CPU_RUN_OVERHEAD_GB,
             "cache": dataset_voxels * (4 * c + 1) / GB,
             "prediction": (largest_voxels * (k + 1 + c) + largest_original_voxels * (k + c)) * 4 / GB}
    return sum(parts.values()), parts
