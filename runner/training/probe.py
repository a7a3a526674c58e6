"""A short probe: seconds per training step, and on a GPU the peak memory, of candidate networks.

Run as a separate process by the planner (which must not import TensorFlow itself, and whose
measurement must not inherit another candidate's allocations):
``python -m segplan.runner.training.probe SPEC_JSON`` prints one JSON line with, per candidate, its seconds per step
(median over a few steps after one warm-up step on random data), seconds to predict one window
(what inference costs per window, without mirroring), the backend's GPU memory peak in
GiB (None on a CPU), and ``oom: true`` when the step ran out of device memory. With ``stop_above``
(limits on ``seconds`` and ``window_seconds``) the candidates, sent narrowest first, are measured
until the first that exceeds a limit: every wider one would be slower still, so measuring it is
time the planner's user waits for nothing.
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np

from segplan.planner.labels import consecutive


def probe(candidates: list[dict], network: dict, loss: dict, in_channels: int, n_classes: int,
          steps: int = 3, mixed_precision: bool = False, stop_above: dict | None = None) -> list[dict]:
    """Measure the candidates in order (up to the first over ``stop_above``): the plan's network
    settings (``network``, a NetworkSection as a dict: architecture, deep supervision, ...) with the
    candidate's filters/pools/kernels (and blocks per stage), at its patch and batch, with the plan's
    loss on every supervised level, weighted as in training."""
    import dataclasses

    import keras
    from segplan.planner.plan import LossSection, NetworkSection, supervised_levels
    from segplan.runner import backend
    from segplan.runner.training.targets import targets
    from segplan.runner.training.losses import compile_arguments
    from segplan.runner.training.model import build_unet, prediction_model
    keras.mixed_precision.set_global_policy(backend.mixed_policy() if mixed_precision else "float32")
    base = NetworkSection(**network)
    loss_cfg = LossSection(**loss)
    out = []
    rng = np.random.default_rng(0)
    shape_keys = ("filters", "pool_sizes", "kernel_sizes", "blocks_per_stage")
    for c in candidates:
        net = dataclasses.replace(base, **{k: c[k] for k in shape_keys if k in c})
        levels = supervised_levels(net)
        x = rng.normal(size=(c["batch"], *c["patch"], in_channels)).astype(np.float32)
        y = targets(rng.integers(0, n_classes, (c["batch"], *c["patch"])), consecutive(n_classes), levels)
        try:
            model = build_unet(net, in_channels, n_classes)
            model.compile(optimizer=keras.optimizers.Adam(1e-3), **compile_arguments(loss_cfg, levels))
            model.train_on_batch(x, y)  # warm-up: graph tracing
            times = []
            for _ in range(steps):
                t = time.perf_counter()
                model.train_on_batch(x, y)
                times.append(time.perf_counter() - t)
            one, full = x[:1], prediction_model(model)
            full.predict_on_batch(one)  # warm-up of the inference graph
            window = []
            for _ in range(2):
                t = time.perf_counter()
                full.predict_on_batch(one)
                window.append(time.perf_counter() - t)
        except Exception as e:  # only the device running out of memory is a result; anything else is an error
            if not backend.is_out_of_memory(e):
                raise
            out.append({"seconds": None, "peak_gb": backend.accelerator_peak_gb(), "oom": True})
            break  # the allocator's state after an out-of-memory error is no base for another measurement
        peak = backend.accelerator_peak_gb()
        out.append({"seconds": float(np.median(times)), "window_seconds": float(np.median(window)),
                    "peak_gb": None if peak is None else round(peak, 3), "oom": False})
        del model, full
        keras.backend.clear_session()
        if stop_above and any(out[-1][k] > v for k, v in stop_above.items()):
            break
    return out


def main() -> None:
    from segplan.runner import backend
    backend.load_quietly()
    spec = json.loads(sys.argv[1])
    print(json.dumps(probe(spec["candidates"], spec["network"], spec["loss"], spec["in_channels"], spec["n_classes"],
                           spec.get("steps", 3), spec.get("mixed_precision", False), spec.get("stop_above"))))


if __name__ == "__main__":
    main()
