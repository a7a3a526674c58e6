"""What the quality check adds to predicting one full-size CT (issue 42): the image features (on
the normalised image at its own resolution), the probability features (on the network's grid) and
the predicted volumes (on the original grid), timed on a 512 x 512 x 300 volume with 4 classes
predicted at 1.6 x 1.6 x 3.0 mm (100 x 224 x 224), as in benchmarks/resample_back_memory.py; and
calibrating its probabilities on the original grid (``--save-probabilities``). Median of 3.

    python benchmarks/trust_overhead.py [--shape 300 512 512] [--classes 4]
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(fn, repeat: int = 3) -> float:
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    return float(np.median(runs))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", type=int, nargs=3, default=[300, 512, 512])
    ap.add_argument("--classes", type=int, default=4)
    a = ap.parse_args()
    from scipy import ndimage

    from segplan.planner.labels import consecutive
    from segplan.runner.trust.checks import Trust
    from segplan.runner.trust.features import image_features, probability_features, volume_features
    rng = np.random.default_rng(0)
    lm = consecutive(a.classes)
    image = ndimage.zoom(rng.normal(0, 1, [max(s // 8, 2) for s in a.shape]).astype(np.float32),
                         [s / max(s // 8, 2) for s in a.shape], order=1)[None]
    grid = [100, 224, 224]
    logits = ndimage.zoom(rng.normal(0, 3, (a.classes, 25, 56, 56)).astype(np.float32), [1, 4, 4, 4], order=1)
    probs = np.exp(logits - logits.max(0))
    probs /= probs.sum(0)
    labels = np.zeros(a.shape, np.uint8)
    labels[100:200, 100:400, 100:400] = rng.integers(0, a.classes, (100, 300, 300), dtype=np.uint8)
    full = np.zeros((a.classes, *a.shape), np.float32)
    full[0] = 0.9
    full[1:] = 0.1 / (a.classes - 1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    trust = Trust(temperature={"near": [1.5], "far": [0.7]})
    print(f"volume {a.shape}, {a.classes} classes, network grid {grid}")
    print(f"image features (one channel, {image[0].size / 1e6:.0f} M voxels): {timed(lambda: image_features(image)):.2f} s")
    print(f"probability features (network grid): {timed(lambda: probability_features(probs, lm)):.2f} s")
    print(f"predicted volumes (original grid): {timed(lambda: volume_features(labels, (1.0, 0.7, 0.7), lm)):.2f} s")
    print(f"calibration of the {full.nbytes / 1e9:.2f} GB float32 probabilities, in place: "
          f"{timed(lambda: trust.calibrate(full, labels, lm, in_place=True), repeat=1):.2f} s; peak memory of all the above +"
          f"{(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1e6:.2f} GB over the inputs")


if __name__ == "__main__":
    main()
