"""Seconds per full-size phantom on CPU, split into preprocessing, network, resampling back and
writing, with peak memory, for a small CPU plan and for the paper's network with a 160x160x80
patch (issue 5). The networks are untrained: speed does not depend on the weights.

    python benchmarks/inference_speed.py [--phantoms /tmp/segplan_phantoms20] [--case 0] [--skip-paper]

Targets: network time at least half the total; faster than nnU-Net v2 on the same volume and CPU
(about 16 s to preprocess one such CT and 18-20 s per 56x192x192 window, same overlap, no mirroring).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(plan, case, out: Path, label: str) -> None:
    from planner.dataset import write_volume
    from runner.infer import keras_predictor
    from runner.model import build_unet
    from runner.predict import predict_case
    model = build_unet(plan.network, len(plan.dataset.channels), len(plan.dataset.labels))
    labels, geom, _, t = predict_case(case, plan, keras_predictor([model]))
    t0 = time.perf_counter()
    write_volume(labels, geom, out / f"{case.case_id}.nii.gz")
    t["write_s"] = time.perf_counter() - t0
    total = sum(t.values())
    print(f"{label}: total {total:.1f} s = " + ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in t.items())
          + f"; network share {100 * t['network_s'] / total:.0f}%; volume {geom.shape} (z, y, x)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phantoms", default="/tmp/segplan_phantoms20")
    ap.add_argument("--case", type=int, default=0)
    ap.add_argument("--skip-paper", action="store_true")
    a = ap.parse_args()
    from benchmarks.common import peak_rss_gb
    from datasets.phantoms import make_phantoms
    from planner.dataset import load_dataset
    from planner.plan_file import load_plan
    from planner.planning import plan_dataset
    data = Path(a.phantoms)
    if not (data / "dataset.json").exists():
        make_phantoms(data, cases=20, workers=2)
    tmp = Path(tempfile.mkdtemp())
    case = load_dataset(data).cases[a.case]
    p = plan_dataset(data, tmp / "cpu.yaml", device="cpu", time_budget=15, workers=2, progress=False)
    cpu = load_plan(p)
    inf = dataclasses.replace(cpu.inference, mirroring=False, overlap=0.5)
    run(cpu.replace(inference=inf), case, tmp, f"small CPU plan (patch {cpu.training.patch_size}, "
                                               f"filters {cpu.network.filters}, spacing {cpu.resampling.target_spacing})")
    if not a.skip_paper:
        p = plan_dataset(data, tmp / "paper.yaml", preset="miscnn-covid19", progress=False)
        paper = load_plan(p)
        run(paper, case, tmp, "paper network 32..512, patch 160x160x80, half overlap, constant weights")
    print(f"peak memory: {peak_rss_gb():.2f} GiB")


if __name__ == "__main__":
    main()
