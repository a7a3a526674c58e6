"""Preprocessing speed and memory, segplan against nnU-Net v2 on the same files and spacing (issue 12).

    python benchmarks/preprocess_speed.py [--cases 8] [--phantoms DIR] [--workers 2]
                                          [--nnunet-python /path/to/venv/bin/python]

Makes (or reuses) N full-size synthetic chest CTs (`segplan make-phantoms`, 512-630 matrix). When an
environment with nnU-Net v2 is given (`--nnunet-python`; or nnunetv2 is importable here: an optional
benchmark extra, never a dependency of segplan), nnU-Net fingerprints, plans and preprocesses them
first (3d_fullres, `-np WORKERS`) and its target spacing is given to segplan too; otherwise segplan
uses --spacing. Each tool runs as its own command; wall time and the peak memory of its whole
process tree (PSS, so forked workers' shared pages count once; sampled every 0.1 s) are printed,
with the ratios. Same machine, same run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import run_measured  # noqa: E402


def nnunet_plans(python: str, dataset: Path, work: Path, workers: int) -> tuple[Path, float, float, dict]:
    """nnU-Net v2's fingerprint and plan of ``dataset``: (its plans file, seconds, peak GiB, the
    environment naming its folders)."""
    raw, pre, res = work / "raw", work / "preprocessed", work / "results"
    for d in (raw, pre, res):
        d.mkdir(parents=True, exist_ok=True)
    name = "Dataset901_Phantoms"
    if not (raw / name).exists():
        (raw / name).symlink_to(dataset.resolve())
    env = dict(os.environ, nnUNet_raw=str(raw), nnUNet_preprocessed=str(pre), nnUNet_results=str(res))
    bin_dir = Path(python).parent
    plan_s, plan_gb, _ = run_measured([str(bin_dir / "nnUNetv2_extract_fingerprint"), "-d", "901", "-np",
                                       str(workers)], env)
    s2, gb2, _ = run_measured([str(bin_dir / "nnUNetv2_plan_experiment"), "-d", "901"], env)
    return pre / name / "nnUNetPlans.json", plan_s + s2, max(plan_gb, gb2), env


def nnunet(python: str, dataset: Path, work: Path, workers: int) -> dict:
    """nnU-Net v2's fingerprint + plan, then its 3d_fullres preprocessing, timed separately."""
    plans_file, plan_s, plan_gb, env = nnunet_plans(python, dataset, work, workers)
    spacing = json.loads(plans_file.read_text())["configurations"]["3d_fullres"]["spacing"]
    bin_dir = Path(python).parent
    pre_s, pre_gb, pre_rss = run_measured([str(bin_dir / "nnUNetv2_preprocess"), "-d", "901", "-c", "3d_fullres",
                                           "-np", str(workers)], env)
    return {"spacing": spacing, "plan_s": plan_s, "plan_gb": plan_gb, "preprocess_s": pre_s,
            "preprocess_gb": pre_gb, "preprocess_rss_gb": pre_rss}


def segplan(dataset: Path, work: Path, spacing: list[float], workers: int) -> dict:
    import dataclasses
    from segplan.planner.plan_file import load_plan, save_plan
    plan_path = work / "plans" / "speed.yaml"
    cli = [sys.executable, "-m", "segplan.runner.cli"]
    plan_s, plan_gb, _ = run_measured(cli + ["plan", str(dataset), "-o", str(plan_path), "--device", "gpu",
                                             "--gpu-memory", "8", "--force", "--workers", str(workers)])
    plan = load_plan(plan_path)
    save_plan(plan.replace(resampling=dataclasses.replace(plan.resampling, target_spacing=list(spacing))), plan_path)
    pre_s, pre_gb, pre_rss = run_measured(cli + ["preprocess", str(plan_path), "--workers", str(workers)])
    return {"spacing": spacing, "plan_s": plan_s, "plan_gb": plan_gb, "preprocess_s": pre_s, "preprocess_gb": pre_gb,
            "preprocess_rss_gb": pre_rss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--phantoms", type=Path, default=None, help="default: a new folder of --cases phantoms")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--spacing", type=float, nargs=3, default=[2.0, 0.77, 0.77], help="z y x mm, without nnU-Net")
    ap.add_argument("--nnunet-python", default=None)
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="preprocess_speed_"))
    data = a.phantoms
    if data is None:
        from segplan.datasets.phantoms import make_phantoms
        data = make_phantoms(work / "phantoms", cases=a.cases, seed=0, scale=1.0, workers=a.workers, progress=False)
    python = a.nnunet_python
    if python is None and subprocess.run([sys.executable, "-c", "import nnunetv2"], capture_output=True).returncode == 0:
        python = sys.executable
    result = {"cases": len(list((Path(data) / "imagesTr").glob("*"))), "workers": a.workers, "cpus": os.cpu_count()}
    spacing = a.spacing
    if python:
        result["nnunet"] = nnunet(python, Path(data), work / "nnunet", a.workers)
        spacing = result["nnunet"]["spacing"]
        print(f"nnU-Net v2: fingerprint + plan {result['nnunet']['plan_s']:.1f} s, preprocessing "
              f"{result['nnunet']['preprocess_s']:.1f} s at {result['nnunet']['preprocess_gb']:.2f} GiB peak", flush=True)
    result["segplan"] = segplan(Path(data), work / "segplan", spacing, a.workers)
    s = result["segplan"]
    print(f"segplan: fingerprint + plan {s['plan_s']:.1f} s, preprocessing {s['preprocess_s']:.1f} s at "
          f"{s['preprocess_gb']:.2f} GiB peak (spacing {spacing})")
    if python:
        n = result["nnunet"]
        result["speedup"] = round(n["preprocess_s"] / s["preprocess_s"], 2)
        result["memory_ratio"] = round(s["preprocess_gb"] / n["preprocess_gb"], 2)
        print(f"preprocessing: segplan {result['speedup']:.2f}x faster at {result['memory_ratio']:.2f}x nnU-Net's memory")
    if a.out:
        a.out.write_text(json.dumps(result, indent=1))
    shutil.rmtree(work / "nnunet" / "preprocessed", ignore_errors=True)


if __name__ == "__main__":
    main()
