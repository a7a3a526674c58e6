"""Fingerprint and plan time and peak memory on full-size phantoms, beside a plain SimpleITK read.

    python benchmarks/plan_speed.py [--cases 20] [--workers 2] [--data /tmp/segplan_phantoms20]

Targets (issue 3): fingerprinting within 1.5x of the pure read time, peak memory under 2 GB,
re-planning from the cache under 2 s. nnU-Net v2 took 36 s to verify, 27 s to fingerprint and 11 s
to plan 20 such CTs on the 2-core reference machine.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _read(path: str) -> int:
    import SimpleITK as sitk
    return sitk.GetArrayFromImage(sitk.ReadImage(path)).size


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--data", default="/tmp/segplan_phantoms20")
    a = ap.parse_args()
    from benchmarks.common import peak_rss_gb
    from segplan.datasets.phantoms import make_phantoms
    from segplan.planner.layouts import load_dataset
    from segplan.planner.planning import plan_dataset
    data = Path(a.data)
    if not (data / "dataset.json").exists():
        t = time.perf_counter()
        make_phantoms(data, cases=a.cases, workers=a.workers)
        print(f"made {a.cases} full-size phantoms in {time.perf_counter() - t:.1f} s")
    ds = load_dataset(data)
    files = [str(p) for c in ds.cases for p in (*c.image_files, c.label_file)]
    t = time.perf_counter()
    with mp.get_context("fork").Pool(a.workers) as pool:
        voxels = sum(pool.map(_read, files, chunksize=1))
    read_s = time.perf_counter() - t
    print(f"plain SimpleITK read of {len(files)} files ({voxels / 1e9:.2f} G voxels), {a.workers} workers: {read_s:.1f} s")
    out = Path(tempfile.mkdtemp()) / "phantoms.yaml"
    t = time.perf_counter()
    plan_dataset(data, out, gpu_memory=8, workers=a.workers, progress=False)
    fp_s = time.perf_counter() - t
    print(f"fingerprint + plan: {fp_s:.1f} s ({fp_s / read_s:.2f}x the read time; target <= 1.5x)")
    t = time.perf_counter()  # another plan name: the cache is the dataset's, so it is reused
    plan_dataset(data, out.with_name("phantoms_4gb.yaml"), gpu_memory=4, workers=a.workers, progress=False)
    print(f"re-plan under another name from the cached fingerprint: {time.perf_counter() - t:.2f} s (target < 2 s)")
    print(f"peak memory: {peak_rss_gb():.2f} GiB (largest of this process and one worker; target < 2 GB)")
    print(f"plans: {out} and {out.with_name('phantoms_4gb.yaml')}")


if __name__ == "__main__":
    main()
