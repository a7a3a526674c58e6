"""Fit the planner's GPU memory constant (bytes per kept activation value, float32 and mixed
precision) to measured peaks (issue 15), and show estimate against measurement per grid point.

    python benchmarks/memory_fit.py [benchmarks/results/gpu_memory_torch.json]

Least squares of (measured peak - weights and optimiser state) = k x activation values, over the
points above 1 GB (below that the allocator's granularity dominates). The result belongs in
planner/memory.py's GPU_BYTES_PER_ACTIVATION; tests/test_memory_model.py checks that it still
matches the committed measurements.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_memory_torch.json"
MIN_GB = 1.0


def points(path: Path = RESULTS) -> list[dict]:
    """Measured grid points with the planner's activation count and weight bytes for each."""
    from benchmarks.gpu_memory import N_CLASSES, row_network
    from segplan.planner.memory import activation_voxels, count_parameters
    out = []
    for r in json.loads(Path(path).read_text())["grid"]:
        if r.get("measured_gb") is None:
            continue
        net = row_network(r)
        out.append({**r, "mixed": r["precision"] != "float32",
                    "activations": activation_voxels(net, r["patch"], N_CLASSES) * r["batch"],
                    "weight_bytes": 16 * count_parameters(net, 1, N_CLASSES), "network": net})
    return out


def fit(rows: list[dict], mixed: bool) -> float:
    from segplan.planner.memory import GB
    sel = [r for r in rows if r["mixed"] == mixed and r["measured_gb"] > MIN_GB]
    num = sum(r["activations"] * (r["measured_gb"] * GB - r["weight_bytes"]) for r in sel)
    return num / sum(r["activations"] ** 2 for r in sel)


def main() -> None:
    from segplan.planner.memory import GB, GPU_BYTES_PER_ACTIVATION
    rows = points(Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS)
    for mixed in (False, True):
        print(f"{'mixed' if mixed else 'float32'}: fitted {fit(rows, mixed):.2f} bytes per activation value "
              f"(planner uses {GPU_BYTES_PER_ACTIVATION[mixed]})")
    for r in rows:
        est = (r["activations"] * GPU_BYTES_PER_ACTIVATION[r["mixed"]] + r["weight_bytes"]) / GB
        kind = f"{r['network'].architecture}{' +DS' if r['network'].deep_supervision else ''}"
        print(f"  {r['patch']} x {r['batch']} {r['filters'][0]}..{max(r['filters'])} {r['precision']:>14} {kind}: "
              f"measured {r['measured_gb']:6.2f} GiB, planner (without the {0.8} GB context) {est:6.2f} "
              f"({100 * (est / r['measured_gb'] - 1):+.0f}%)")


if __name__ == "__main__":
    main()
