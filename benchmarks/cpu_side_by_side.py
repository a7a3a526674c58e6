"""Issue 40's CPU side by side, in one run: training steps per second with TensorFlow's oneDNN off
and on, and whole-case prediction of a full-size synthetic CT by today's path, segplan's new
default and nnU-Net v2, each in its own process with its wall time and peak memory.

    python benchmarks/cpu_side_by_side.py --nnunet-python /path/to/nnunet_venv/bin/python \\
        [--phantoms /tmp/segplan_phantoms20] [--spacing paper|plan] [--out FILE.json]

1. Training: the 5-minute Hippocampus plan's network (8..64 filters, patch 32x48x32, batch 3; the
   issue's) through benchmarks/cpu_step_settings.py, oneDNN off then on, interleaved twice, median
   of 10 steps each.
2. The case: phantom 0 of ``--phantoms`` (20 full-size synthetic chest CTs, made if missing)
   resampled onto a 512 x 512 x 300 grid of 0.75 x 0.75 x 1.0 mm (air around it): the size of a
   thin-slice chest CT.
3. The plan: the CPU planner's plan of the phantoms for a 15-minute budget (its speed probe and its
   engine probe on this machine), predicted with half-overlapping windows, Gaussian weighting and no
   mirroring (nnU-Net's predictor, without its mirroring). ``--spacing paper`` (default) predicts at
   the paper's 1.58 x 1.58 x 2.70 mm, the mission's spacing for COVID-19 chest CT; ``plan`` keeps the
   planner's (the phantoms' own, thinner, about 6x the windows). Networks are untrained: the time
   does not depend on the weights.
4. Three paths, each a fresh process, wall time and peak memory of its whole process tree (PSS;
   RSS beside it) sampled every 0.1 s (benchmarks/common.run_measured):
   - today's path: Keras on TensorFlow with oneDNN as TensorFlow leaves it on this CPU (off without
     AVX-512 neural-network features or AMX), what segplan ran before issue 40;
   - the new default: what `segplan predict` runs now (oneDNN on, the plan's ``inference.engine``
     as its probe chose it);
   - nnU-Net v2 (``--nnunet-python``: its own environment, never a dependency of segplan): its own
     preprocessing, sliding window and export with a PlainConvUNet of the same depth, filters,
     pooling, patch and spacing (benchmarks/nnunet_predict.py).
Each process's wall time is the whole command as a user meets it (TensorFlow's start, Keras' first
trace, the ONNX export and OpenVINO's compilation, which `segplan predict` keeps per fold in a work
folder but this process, without one, makes anew); "inside" is the case alone (read, preprocess,
network, back to the original grid, write). Prints a table and a JSON line (``--out`` writes it too).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HERE = Path(__file__).resolve().parent
PAPER_SPACING = [2.70, 1.58, 1.58]   # z, y, x (mm): the paper's resampling (../shared/PAPER.md)
SHAPE, SPACING = (300, 512, 512), (1.0, 0.75, 0.75)   # z, y, x
OFF, ON = {"TF_ENABLE_ONEDNN_OPTS": "0"}, {"TF_ENABLE_ONEDNN_OPTS": "1"}


def training_steps(rounds: int = 2) -> dict:
    """Seconds per training step of the Hippocampus CPU network, oneDNN off and on (medians)."""
    runs = {"off": [], "on": []}
    for _ in range(rounds):
        for name, env in (("off", OFF), ("on", ON)):
            child = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"} | env
            out = subprocess.run([sys.executable, str(HERE / "cpu_step_settings.py"), "--one", "auto", "0", "0",
                                  "--filters", "8", "16", "32", "64", "--patch", "32", "48", "32", "--batch", "3",
                                  "--steps", "10"], capture_output=True, text=True, check=True, env=child)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1])["seconds_per_step"])
            print(f"training step, oneDNN {name}: {runs[name][-1]:.3f} s", flush=True)
    return {k: round(statistics.median(v), 4) for k, v in runs.items()} | {"runs": runs}


def full_size_ct(phantom: Path, label: Path, out: Path) -> Path:
    """The phantom resampled onto the 512 x 512 x 300 grid, centred, air (-1000 HU) outside."""
    import SimpleITK as sitk
    img = sitk.ReadImage(str(phantom))
    size = [SHAPE[2], SHAPE[1], SHAPE[0]]
    spacing = [SPACING[2], SPACING[1], SPACING[0]]
    centre = img.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in img.GetSize()])
    origin = [c - (n - 1) * s / 2 for c, n, s in zip(centre, size, spacing)]
    ref = sitk.Image(size, sitk.sitkInt16)
    ref.SetSpacing(spacing)
    ref.SetOrigin(origin)
    ref.SetDirection(img.GetDirection())
    out.mkdir(parents=True, exist_ok=True)
    path = out / "ct512_0000.nii.gz"
    sitk.WriteImage(sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear, -1000.0, sitk.sitkInt16), str(path))
    return path


def child(plan_path: str, image: str, out: str, engine: str) -> None:
    """One path's prediction of the case (its own process): timings as a JSON line."""
    from benchmarks.inference_speed import run
    from segplan.planner.dataset import Case
    from segplan.planner.plan_file import load_plan
    Path(out).mkdir(parents=True, exist_ok=True)
    total = run(load_plan(Path(plan_path)), Case("ct512", (Path(image),), None), Path(out), engine, engine)
    print(json.dumps({"seconds": round(total, 2)}))


def measured(cmd: list[str], env: dict) -> dict:
    """Wall time and peak memory of ``cmd``'s process tree, and the last JSON line it printed."""
    from benchmarks.common import run_measured
    log = Path(tempfile.mkstemp(suffix=".log")[1])
    with open(log, "w") as f:
        wall, pss, rss = run_measured(cmd, env, output=f)
    lines = [line for line in log.read_text().splitlines() if line.startswith("{")]
    inner = json.loads(lines[-1]) if lines else {}
    return {"wall_s": round(wall, 1), "peak_pss_gb": round(pss, 2), "peak_rss_gb": round(rss, 2), **inner,
            "log": str(log)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phantoms", default="/tmp/segplan_phantoms20")
    ap.add_argument("--nnunet-python", default=None)
    ap.add_argument("--spacing", choices=["paper", "plan"], default="paper")
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", nargs=4, metavar=("PLAN", "IMAGE", "OUT", "ENGINE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(*a.child)
    from benchmarks.onednn_step import cpu_flags
    from segplan.datasets.phantoms import make_phantoms
    from segplan.planner.layouts import load_dataset
    from segplan.planner.plan_file import load_plan, save_plan
    from segplan.planner.planning import plan_dataset
    result = {"cpu": cpu_flags(), "cores": os.cpu_count()}
    print(f"CPU: {result['cpu']}; {result['cores']} cores", flush=True)
    if not a.skip_training:
        result["training_s_per_step"] = training_steps()
    data = Path(a.phantoms)
    if not (data / "dataset.json").exists():
        make_phantoms(data, cases=20, workers=2)
    tmp = Path(tempfile.mkdtemp(prefix="side_by_side_"))
    first = load_dataset(data).cases[0]
    image = full_size_ct(first.image_files[0], first.label_file, tmp / "input")
    plan = load_plan(plan_dataset(data, tmp / "cpu.yaml", device="cpu", time_budget=15, workers=2, progress=False))
    if a.spacing == "paper":
        plan = plan.replace(resampling=dataclasses.replace(plan.resampling, target_spacing=PAPER_SPACING))
    plan = plan.replace(inference=dataclasses.replace(plan.inference, mirroring=False, overlap=0.5,
                                                      weighting="gaussian"))
    save_plan(plan, tmp / "predict.yaml")
    result["plan"] = {"filters": plan.network.filters, "patch": plan.training.patch_size,
                      "spacing": plan.resampling.target_spacing, "engine": plan.inference.engine,
                      "engine_why": "the planner's engine probe on this machine"}
    print(f"plan: {result['plan']}", flush=True)
    base = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    me = [sys.executable, str(Path(__file__).resolve()), "--child", str(tmp / "predict.yaml"), str(image)]
    # TensorFlow turns oneDNN on by itself only with AVX-512 neural-network features or AMX (runner/backend.py)
    tf_default = ON if any(f in result["cpu"].split() for f in ("avx512_vnni", "avx512_bf16", "amx_tile")) else OFF
    today = f"today's path (Keras, oneDNN {'on' if tf_default is ON else 'off'} as TensorFlow leaves it here)"
    paths = {today: (me + [str(tmp / "a"), "keras"], base | tf_default),
             "new default (`segplan predict`)": (me + [str(tmp / "b"), "plan"], base)}
    if a.nnunet_python:
        from benchmarks.preprocess_speed import nnunet_plans
        plans_file = nnunet_plans(a.nnunet_python, data, tmp / "nnunet", 2)[0]
        net = plan.network
        spec = {"plans": str(plans_file), "dataset_json": str(data / "dataset.json"), "image": str(image),
                "out": str(tmp / "c" / "ct512"), "patch": plan.training.patch_size,
                "spacing": plan.resampling.target_spacing, "features": net.filters, "pools": net.pool_sizes,
                "kernels": net.kernel_sizes}
        paths["nnU-Net v2 (same network and windows)"] = (
            [a.nnunet_python, str(HERE / "nnunet_predict.py"), json.dumps(spec)], base)
    result["prediction"] = {}
    for name, (cmd, env) in paths.items():
        r = measured(cmd, env)
        result["prediction"][name] = r
        print(f"{name}: {r['wall_s']} s wall ({r.get('seconds')} s inside), peak {r['peak_pss_gb']} GiB PSS "
              f"({r['peak_rss_gb']} GiB RSS)", flush=True)
    print("\n| | whole case (process wall) | inside the process | peak memory (PSS / RSS) |\n|---|---|---|---|")
    for name, r in result["prediction"].items():
        print(f"| {name} | {r['wall_s']} s | {r.get('seconds')} s | {r['peak_pss_gb']} / {r['peak_rss_gb']} GiB |")
    if "training_s_per_step" in result:
        t = result["training_s_per_step"]
        print(f"training step: oneDNN off {t['off']:.3f} s, on {t['on']:.3f} s ({t['off'] / t['on']:.2f}x)")
    line = json.dumps(result)
    print(line)
    if a.out:
        Path(a.out).write_text(line + "\n")


if __name__ == "__main__":
    main()
