"""Measured training memory and step time of segplan's U-Net beside the planner's estimate (issue 15).

    KERAS_BACKEND=torch python benchmarks/gpu_memory.py [--grid full|tiny] [--out results.json]

For each grid point (patch, batch, first-stage filters, precision) one process builds the plan's
network (segplan.runner.training.model.build_unet, nnU-Net topology from segplan.planner.heuristics), compiles it with the
plan's Tversky + cross-entropy loss and Adam, runs 2 warm-up and N timed training steps on random
data, and records the backend's own peak of allocated device memory for that point
(torch.cuda.max_memory_allocated after a reset, jax's peak_bytes_in_use, TensorFlow's
get_memory_info peak) next to segplan.planner.memory.estimate_training_gb. It ends with the sliding-window
prediction time of one paper-sized CT (320 x 320 x 128 voxels at the paper's 160 x 160 x 80 patch,
half-patch overlap). Runs where keras has a GPU backend; on a CPU the memory column is empty.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GRIDS = {
    # (patch z y x, batch, first filters, precision[, kind: plain (default), plain_ds, resenc, resenc_ds, ...:
    # point_network])
    "full": [([80, 160, 160], 2, 32, "float32"), ([80, 160, 160], 2, 32, "mixed_float16"),
             ([80, 160, 160], 2, 32, "mixed_bfloat16"), ([40, 56, 40], 9, 32, "float32"),
             ([32, 32, 32], 1, 8, "float32"), ([32, 32, 32], 4, 8, "float32"), ([32, 32, 32], 2, 16, "float32"),
             ([32, 32, 32], 2, 32, "float32"), ([64, 64, 64], 2, 16, "float32"), ([64, 64, 64], 2, 32, "float32"),
             ([64, 64, 64], 4, 32, "mixed_bfloat16"), ([64, 128, 128], 2, 32, "float32"),
             ([96, 96, 96], 2, 32, "float32"), ([80, 160, 160], 4, 32, "mixed_bfloat16"),
             # deep supervision and nnU-Net's residual encoder (issue 21): the resenc presets' sizes
             ([64, 128, 128], 2, 32, "float32", "plain_ds"), ([80, 160, 160], 2, 32, "mixed_bfloat16", "plain_ds"),
             ([64, 64, 64], 2, 32, "float32", "resenc_ds"), ([64, 128, 128], 2, 32, "float32", "resenc_ds"),
             ([96, 160, 160], 2, 32, "float32", "resenc_ds"), ([80, 160, 160], 2, 32, "mixed_bfloat16", "resenc_ds"),
             ([128, 128, 128], 2, 32, "float32", "resenc")],
    "tiny": [([16, 32, 32], 2, 4, "float32"), ([16, 32, 32], 1, 8, "float32")],
    # one point per process where the backend's peak cannot be reset (jax)
    "paper_f32": [([80, 160, 160], 2, 32, "float32")],
    "paper_bf16": [([80, 160, 160], 2, 32, "mixed_bfloat16")],
}
N_CLASSES = 4
GB = 1024 ** 3


def backend_peak_reset() -> None:
    import keras
    if keras.backend.backend() == "torch":
        import torch
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


def backend_peak_gb() -> float | None:
    """Peak device memory allocated since the last reset (GiB); None on a CPU."""
    import keras
    b = keras.backend.backend()
    if b == "torch":
        import torch
        return torch.cuda.max_memory_allocated() / GB if torch.cuda.is_available() else None
    if b == "jax":
        import jax
        dev = jax.devices()[0]
        stats = dev.memory_stats() if dev.platform == "gpu" else None
        return stats["peak_bytes_in_use"] / GB if stats else None
    if b == "tensorflow":
        import tensorflow as tf
        if tf.config.list_physical_devices("GPU"):
            return tf.config.experimental.get_memory_info("GPU:0")["peak"] / GB
    return None


def network(patch: list[int], width: int, architecture: str = "plain", deep_supervision: bool = False,
            activation: str | None = None):
    """The default planner's topology for an isotropic patch (3D, or 2D for two entries): nnU-Net pooling, 16x width at most; the
    plain U-Net of the paper, or the residual encoder of the resenc presets (heuristics.RESENC_NETWORK),
    with its own activation unless one is given."""
    import dataclasses

    from segplan.planner import heuristics as H
    pools, kernels = H.topology(patch, [1.0] * len(patch))  # 3 axes, or a 2d plan's 2
    filters = H.filters_for(len(pools) + 1, width, 16 * width)
    template = H.RESENC_NETWORK if architecture == "residual_encoder" else H.PLAIN_NETWORK
    template = dataclasses.replace(template, deep_supervision=deep_supervision,
                                   activation=activation or template.activation)
    return H.shaped(template, filters, pools, kernels)


def row_network(row: dict):
    """The network a measured grid row was taken with (rows before deep supervision and residual
    encoders: the plain U-Net with one output and ReLU)."""
    return network(row["patch"], row["filters"][0], row.get("architecture", "plain"), row.get("deep_supervision", False),
                   row.get("activation"))


def point_network(patch: list[int], width: int, kind: str):
    """A grid point's kind: plain or resenc, then optionally _ds (deep supervision) and _leaky or
    _relu (the other activation than the architecture's own): plain_ds, resenc_ds, plain_leaky, ..."""
    base, *options = kind.split("_")
    activation = "leaky_relu" if "leaky" in options else "relu" if "relu" in options else None
    return network(patch, width, "residual_encoder" if base == "resenc" else "plain", "ds" in options, activation)


def compiled_model(net, patch, batch):
    """The grid point's U-Net compiled with the plan's loss (on every supervised level) and Adam, and
    one random batch for it."""
    import keras
    from segplan.planner.plan import LossSection, supervised_levels
    from segplan.planner.labels import consecutive
    from segplan.runner.training.targets import targets
    from segplan.runner.training.losses import compile_arguments
    from segplan.runner.training.model import build_unet
    model = build_unet(net, 1, N_CLASSES)
    levels = supervised_levels(net)
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  **compile_arguments(LossSection(0.5, 0.5, 1.0, 1.0, 1e-6), levels))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, *patch, 1)).astype(np.float32)
    y = targets(rng.integers(0, N_CLASSES, size=(batch, *patch)), consecutive(N_CLASSES), levels)
    return model, x, y


def measure(patch, batch, width, precision, steps: int, kind: str = "plain") -> dict:
    import keras
    from segplan.planner.memory import estimate_training_gb
    keras.mixed_precision.set_global_policy(precision)
    net = point_network(patch, width, kind)
    est = estimate_training_gb(net, patch, batch, 1, N_CLASSES, precision != "float32")
    backend_peak_reset()
    model, x, y = compiled_model(net, patch, batch)
    times = []
    for i in range(2 + steps):
        t = time.perf_counter()
        loss = float(model.train_on_batch(x, y))
        if i >= 2:
            times.append(time.perf_counter() - t)
    peak = backend_peak_gb()
    row = {"patch": patch, "batch": batch, "filters": net.filters, "precision": precision,
           "architecture": net.architecture, "deep_supervision": net.deep_supervision, "activation": net.activation,
           "step_s": round(statistics.median(times), 4), "loss_finite": bool(np.isfinite(loss)),
           "measured_gb": None if peak is None else round(peak, 3), "estimate_gb": round(est, 3)}
    if peak:
        row["estimate_over_measured"] = round(est / peak, 3)
    del model
    gc.collect()
    keras.backend.clear_session()
    return row


def window_time(volume_shape=(128, 320, 320), patch=(80, 160, 160)) -> dict:
    """Sliding-window prediction of one paper-sized CT with the paper's network (float32, no mirroring)."""
    import keras
    from segplan.runner.inference.infer import keras_predictor, sliding_window, window_starts
    from segplan.runner.training.model import build_unet
    keras.mixed_precision.set_global_policy("float32")
    model = build_unet(network(list(patch), 32), 1, N_CLASSES)
    vol = np.random.default_rng(1).normal(size=(1, *volume_shape)).astype(np.float32)
    predict = keras_predictor([model])
    predict(vol[None, :, :patch[0], :patch[1], :patch[2]])  # warm-up
    t = time.perf_counter()
    out = sliding_window(vol, list(patch), predict, N_CLASSES, 0.5, "constant", 1)
    return {"volume": list(volume_shape), "patch": list(patch), "seconds": round(time.perf_counter() - t, 2),
            "windows": int(np.prod([len(window_starts(s, p, 0.5)) for s, p in zip(volume_shape, patch)])),
            "finite": bool(np.isfinite(out).all())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", choices=sorted(GRIDS), default="full")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-window", action="store_true")
    a = ap.parse_args()
    import keras
    info = {"backend": keras.backend.backend(), "keras": keras.__version__}
    if info["backend"] == "torch":
        import torch
        info |= {"torch": torch.__version__,
                 "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    print(json.dumps(info), flush=True)
    rows = []
    for patch, batch, width, precision, *kind in GRIDS[a.grid]:
        try:
            row = measure(patch, batch, width, precision, a.steps, *kind)
        except Exception as e:  # one point out of memory must not lose the others: record it and go on
            row = {"patch": patch, "batch": batch, "width": width, "precision": precision, "kind": (kind or ["plain"])[0],
                   "error": repr(e)[:300]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"info": info, "grid": rows}
    if not a.no_window:
        result["sliding_window"] = window_time()
        print(json.dumps(result["sliding_window"]), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("KERAS_BACKEND", "torch")
    main()
