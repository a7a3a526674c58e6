"""Bytes a case adds to cv_report.html (issue 26: a CV of 50 cases under ~20 MB), for a chest CT of
the usual size: the real CT of shared/data/ct_example (122 x 101 x 30 voxels, 42 organ labels)
resampled to 512 x 512 x 300 with 25 HU of noise (so the image does not compress better than a real
scan), its label map as both reference and prediction.

    python benchmarks/html_report_size.py [--cases 50] [--report WORK/cv_report.html]

Prints the bytes of each part of a case's viewer (base64, as stored in the page) and the estimate
for ``--cases`` cases; with ``--report``, also the size of a written report and its bytes per case.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import ROOT  # noqa: E402

CT = ROOT.parent / "shared" / "data" / "ct_example"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=50)
    ap.add_argument("--report", type=Path, help="a written cv_report.html to measure as well")
    a = ap.parse_args()
    from segplan.planner.dataset import read_volume
    from segplan.runner.evaluation.html_report import MAX_SIDE, MAX_SLICES, WEBP_QUALITY, case_mosaics
    image, geom = read_volume(CT / "images" / "example_ct.nii.gz")
    label, _ = read_volume(CT / "labels" / "example_ct.nii.gz")
    zoom = (300 / image.shape[0], 512 / image.shape[1], 512 / image.shape[2])
    big = ndimage.zoom(image.astype(np.float32), zoom, order=1)
    big += np.random.default_rng(0).normal(0, 25, big.shape).astype(np.float32)
    lab = ndimage.zoom(label, zoom, order=0)
    spacing = [s / z for s, z in zip(geom.spacing, zoom)]
    m = case_mosaics(big, lab, lab, spacing, list(range(int(lab.max()) + 1)))
    parts = {k: len(m[k]) for k in ("image", "reference", "prediction")}
    per_case = sum(parts.values())
    print(f"a {'x'.join(map(str, big.shape))} CT, stored as {len(m['slices'])} slices of {m['tile'][0]}x{m['tile'][1]} "
          f"(MAX_SIDE {MAX_SIDE}, MAX_SLICES {MAX_SLICES}, WebP quality {WEBP_QUALITY})")
    print("bytes per case: " + ", ".join(f"{k} {v / 1e3:.0f} KB" for k, v in parts.items())
          + f"; total {per_case / 1e3:.0f} KB")
    print(f"{a.cases} cases: {a.cases * per_case / 1e6:.1f} MB (plus the table and plots, ~0.2 MB)")
    if a.report:
        text = a.report.read_text()
        n = len(re.findall(r'<section class="viewer"', text))
        print(f"{a.report}: {len(text.encode()) / 1e6:.2f} MB, {n} cases, "
              f"{len(text.encode()) / max(n, 1) / 1e3:.0f} KB per case on average")


if __name__ == "__main__":
    main()
