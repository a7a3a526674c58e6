"""The plain-SimpleITK baseline the benchmarks compare against: read, resample (B-spline image,
nearest label), write, nothing else."""
from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import SimpleITK as sitk


def _one(args) -> None:
    img_path, lbl_path, spacing_zyx, out = args
    target = tuple(reversed(spacing_zyx))
    for path, interp in ((img_path, sitk.sitkBSpline), (lbl_path, sitk.sitkNearestNeighbor)):
        img = sitk.ReadImage(str(path))
        size = [max(1, int(round(n * s / t))) for n, s, t in zip(img.GetSize(), img.GetSpacing(), target)]
        res = sitk.Resample(img, size, sitk.Transform(), interp, img.GetOrigin(), target, img.GetDirection())
        sitk.WriteImage(res, str(Path(out) / Path(path).name.replace(".nii.gz", ".nii")))


def sitk_read_resample_write(dataset: Path, spacing_zyx, out: Path, workers: int = 2) -> None:
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(img, Path(dataset) / "labelsTr" / img.name.replace("_0000", ""), spacing_zyx, out)
            for img in sorted((Path(dataset) / "imagesTr").glob("*_0000.nii.gz"))]
    with mp.get_context("fork").Pool(workers) as pool:
        pool.map(_one, jobs, chunksize=1)
