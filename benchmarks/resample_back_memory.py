"""Peak memory and time of putting a case's probabilities back on its original grid (issue 40,
point 3): a 512 x 512 x 300 CT (0.7 x 0.7 x 1.0 mm) with 4 classes, predicted at the 15-minute CPU
plan's kind of spacing (1.6 x 1.6 x 3.0 mm: 100 x 224 x 224), as the label map only (what `segplan
predict` computes by default) and with the probabilities (``--save-probabilities``, ensembles,
region plans). Each measurement runs in its own process; the figure is that process's peak
resident memory above what it held before the call (the inputs: the probabilities at target
spacing, 80 MB).

    python benchmarks/resample_back_memory.py [--classes 4] [--shape 300 512 512]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
ROOT = Path(__file__).resolve().parents[1]


def measure(shape: list[int], classes: int, full: bool) -> dict:
    import dataclasses

    import numpy as np

    from segplan.planner.plan_file import load_plan
    from segplan.runner.preprocessing.inversion import invert_probabilities
    from segplan.runner.preprocessing.resampling import target_shape
    spacing, target = [1.0, 0.7, 0.7], [3.0, 1.6, 1.6]
    plan = load_plan(ROOT / "plans" / "hippocampus_cpu.yaml", check_paths=False)
    plan = plan.replace(resampling=dataclasses.replace(plan.resampling, target_spacing=target))
    small = target_shape(shape, spacing, target)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(classes, *small)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(0, keepdims=True)
    del logits
    props = {"geometry": {"spacing": spacing, "origin": [0.0] * 3, "direction": [1.0, 0, 0, 0, 1, 0, 0, 0, 1],
                          "shape": shape},
             "crop_box": [[0, s] for s in shape], "cropped_shape": shape, "resampled_shape": small}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    t = time.perf_counter()
    out = invert_probabilities(probs, props, plan, full=full)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    return {"full": full, "shape": shape, "classes": classes, "resampled_shape": small, "seconds": round(seconds, 2),
            "peak_above_inputs_gb": round(peak - before, 3), "output_dtype": str(out.dtype),
            "output_gb": round(out.nbytes / 1024 ** 3, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--shape", type=int, nargs=3, default=[300, 512, 512])
    ap.add_argument("--one", choices=["labels", "probabilities"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(measure(a.shape, a.classes, a.one == "probabilities")))
        return
    results = []
    for one in ("labels", "probabilities"):
        r = subprocess.run([sys.executable, __file__, "--one", one, "--classes", str(a.classes), "--shape",
                            *map(str, a.shape)], capture_output=True, text=True, check=True)
        results.append(json.loads(r.stdout.strip().splitlines()[-1]))
        x = results[-1]
        print(f"{one}: {x['seconds']} s, peak {x['peak_above_inputs_gb']} GB above the inputs, output "
              f"{x['output_dtype']} {x['output_gb']} GB", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
