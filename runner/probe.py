"""A short speed probe: seconds per training step of candidate networks on this machine.

Run as a separate process by the planner (which must not import TensorFlow itself):
``python -m runner.probe CANDIDATES_JSON`` prints one JSON line with the seconds per step of each
candidate, measured over a few steps after one warm-up step on random data.
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np


def probe(candidates: list[dict], network: dict, loss: dict, in_channels: int, n_classes: int,
          steps: int = 3) -> list[float]:
    """Median seconds per training step of each candidate: the plan's network settings (``network``,
    a NetworkSection as a dict) with the candidate's filters, and the plan's loss."""
    import dataclasses

    import keras
    from planner.plan import LossSection, NetworkSection
    from runner.losses import make_loss
    from runner.model import build_unet
    base = NetworkSection(**network)
    loss_fn = make_loss(LossSection(**loss))
    out = []
    rng = np.random.default_rng(0)
    for c in candidates:
        net = dataclasses.replace(base, filters=c["filters"], pool_sizes=c["pool_sizes"], kernel_sizes=c["kernel_sizes"])
        model = build_unet(net, in_channels, n_classes)
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss_fn)
        x = rng.normal(size=(c["batch"], *c["patch"], in_channels)).astype(np.float32)
        y = np.eye(n_classes, dtype=np.float32)[rng.integers(0, n_classes, (c["batch"], *c["patch"]))]
        model.train_on_batch(x, y)  # warm-up: graph tracing
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            model.train_on_batch(x, y)
            times.append(time.perf_counter() - t)
        out.append(float(np.median(times)))
        keras.backend.clear_session()
    return out


def main() -> None:
    spec = json.loads(sys.argv[1])
    print(json.dumps(probe(spec["candidates"], spec["network"], spec["loss"], spec["in_channels"], spec["n_classes"],
                           spec.get("steps", 3))))


if __name__ == "__main__":
    main()
