"""Seconds per full-size phantom on CPU, split into preprocessing, network, resampling back and
writing, with peak memory, for a small CPU plan and for the paper's network with a 160x160x80
patch (issue 5). The networks are untrained: speed does not depend on the weights.

    python benchmarks/inference_speed.py [--phantoms /tmp/segplan_phantoms20] [--case 0] [--skip-paper]
                                         [--nnunet-python /path/to/venv/bin/python] [--engine keras|plan]

With ``--nnunet-python`` (an environment with nnU-Net v2; never a dependency of segplan), nnU-Net
first plans the phantoms (for its spacing, given to segplan's CPU plan too), then predicts the same
case through its own pipeline with a network of the CPU plan's depth, filters, pooling and patch,
half overlap, no mirroring (benchmarks/nnunet_predict.py), and the ratio is printed: the same
network and windows, so the difference is each tool's own work around them.

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


def run(plan, case, out: Path, label: str, engine: str = "keras") -> float:
    """``engine``: "keras" (the path before issue 40: Keras on TensorFlow) or "plan" (the plan's
    ``inference.engine``, what `segplan predict` uses)."""
    from segplan.planner.dataset import write_volume
    from segplan.runner.inference.engines import engine_predictor
    from segplan.runner.inference.infer import keras_predictor
    from segplan.runner.training.model import build_unet, prediction_model
    from segplan.runner.inference.case import predict_case
    model = prediction_model(build_unet(plan.network, len(plan.dataset.channels), len(plan.dataset.labels)))
    predict = keras_predictor([model]) if engine == "keras" else engine_predictor(plan, [model])
    label = f"{label}, engine {plan.inference.engine if engine == 'plan' else 'keras'}"
    labels, geom, _, t, _ = predict_case(case, plan, predict)
    t0 = time.perf_counter()
    write_volume(labels, geom, out / f"{case.case_id}.nii.gz")
    t["write_s"] = time.perf_counter() - t0
    total = sum(t.values())
    print(f"{label}: total {total:.1f} s = " + ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in t.items())
          + f"; network share {100 * t['network_s'] / total:.0f}%; volume {geom.shape} (z, y, x)")
    return total


def nnunet_case(python: str, plans_file: Path, data: Path, case, plan, out: Path) -> float:
    """nnU-Net's seconds for the case with the network of ``plan`` (benchmarks/nnunet_predict.py)."""
    import json
    import subprocess
    net = plan.network
    spec = {"plans": str(plans_file), "dataset_json": str(data / "dataset.json"), "image": str(case.image_files[0]),
            "out": str(out / f"nnunet_{case.case_id}"), "patch": plan.training.patch_size,
            "spacing": plan.resampling.target_spacing, "features": net.filters, "pools": net.pool_sizes,
            "kernels": net.kernel_sizes}
    r = subprocess.run([python, str(Path(__file__).with_name("nnunet_predict.py")), json.dumps(spec)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"nnU-Net's prediction failed: {r.stderr.strip()[-2000:]}")
    seconds = json.loads(r.stdout.strip().splitlines()[-1])["seconds"]
    print(f"nnU-Net v2, same network and windows: total {seconds:.1f} s")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phantoms", default="/tmp/segplan_phantoms20")
    ap.add_argument("--case", type=int, default=0)
    ap.add_argument("--skip-paper", action="store_true")
    ap.add_argument("--nnunet-python", default=None)
    ap.add_argument("--engine", choices=["keras", "plan"], default="keras",
                    help="keras: Keras on TensorFlow for every window (the path before issue 40); plan: the engine "
                         "the CPU planner measured and chose (what `segplan predict` runs). One per process, so that "
                         "the peak memory printed is that path's")
    a = ap.parse_args()
    from benchmarks.common import peak_rss_gb
    from segplan.datasets.phantoms import make_phantoms
    from segplan.planner.layouts import load_dataset
    from segplan.planner.plan_file import load_plan
    from segplan.planner.planning import plan_dataset
    data = Path(a.phantoms)
    if not (data / "dataset.json").exists():
        make_phantoms(data, cases=20, workers=2)
    tmp = Path(tempfile.mkdtemp())
    case = load_dataset(data).cases[a.case]
    p = plan_dataset(data, tmp / "cpu.yaml", device="cpu", time_budget=15, workers=2, progress=False)
    cpu = load_plan(p)
    plans_file = None
    if a.nnunet_python:
        import json
        from benchmarks.preprocess_speed import nnunet_plans
        plans_file = nnunet_plans(a.nnunet_python, data, tmp / "nnunet", 2)[0]
        spacing = json.loads(plans_file.read_text())["configurations"]["3d_fullres"]["spacing"]
        cpu = cpu.replace(resampling=dataclasses.replace(cpu.resampling, target_spacing=list(spacing)))
    inf = dataclasses.replace(cpu.inference, mirroring=False, overlap=0.5, weighting="gaussian")
    cpu = cpu.replace(inference=inf)
    ours = run(cpu, case, tmp, f"small CPU plan (patch {cpu.training.patch_size}, filters {cpu.network.filters}, "
                               f"spacing {cpu.resampling.target_spacing})", a.engine)
    if plans_file is not None:
        theirs = nnunet_case(a.nnunet_python, plans_file, data, case, cpu, tmp)
        print(f"whole-case prediction: segplan {theirs / ours:.2f}x faster than nnU-Net v2")
    if not a.skip_paper:
        p = plan_dataset(data, tmp / "paper.yaml", preset="miscnn-covid19", progress=False)
        paper = load_plan(p)
        run(paper, case, tmp, "paper network 32..512, patch 160x160x80, half overlap, constant weights")
    print(f"peak memory: {peak_rss_gb():.2f} GiB")


if __name__ == "__main__":
    main()
