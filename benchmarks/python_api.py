"""A cohort through `segplan predict` (one process per case, as a shell loop over a cohort does)
against ``Predictor`` (networks loaded once, ``predict`` per case): the same voxels, and the time
each takes (issue 39).

    python benchmarks/python_api.py PLAN IMAGES_DIR [--cases 3]

IMAGES_DIR holds one file per case (``<case>.nii.gz`` or ``<case>_0000.nii.gz``). Prints, per case,
whether the label maps agree voxel for voxel and on their grid, then the seconds of each way, and a
JSON line.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("plan", type=Path)
    ap.add_argument("images", type=Path)
    ap.add_argument("--cases", type=int, default=3)
    ap.add_argument("--first", type=int, default=0, help="skip this many images (sorted by name)")
    a = ap.parse_args()
    images = sorted(p for p in a.images.iterdir() if p.name.endswith((".nii.gz", ".nii", ".nrrd", ".mha")))[a.first:a.first + a.cases]
    tmp = Path(tempfile.mkdtemp(prefix="segplan_api_"))
    t0 = time.perf_counter()
    for image in images:   # a shell loop: one `segplan predict` per case
        one = tmp / "in" / image.stem.split(".")[0]
        one.mkdir(parents=True)
        (one / image.name).symlink_to(image.resolve())
        subprocess.run(["segplan", "predict", str(a.plan), "-i", str(one), "-o", str(tmp / "cli")], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cli_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    from segplan import Predictor
    predictor = Predictor.from_plan(a.plan)
    load_s = time.perf_counter() - t0
    results = []
    for image in images:
        t1 = time.perf_counter()
        label_map = predictor.predict(image)
        seconds = time.perf_counter() - t1
        case_id = re.sub(r"_\d{4}$", "", image.name.split(".")[0])   # <case>_0000.nii.gz -> <case>
        written = sitk.ReadImage(str(tmp / "cli" / f"{case_id}.nii.gz"))
        same = bool(np.array_equal(sitk.GetArrayFromImage(label_map), sitk.GetArrayFromImage(written))
                    and np.allclose(label_map.GetOrigin(), written.GetOrigin(), atol=1e-4)
                    and np.allclose(label_map.GetSpacing(), written.GetSpacing(), atol=1e-4)
                    and np.allclose(label_map.GetDirection(), written.GetDirection(), atol=1e-4))
        results.append({"case": image.name, "voxels": int(np.prod(label_map.GetSize())), "same_as_cli": same,
                        "predict_s": round(seconds, 2)})
        print(f"{image.name}: {'same voxels and grid as' if same else 'DIFFERS from'} segplan predict; "
              f"Predictor.predict {seconds:.1f} s", flush=True)
    api_s = time.perf_counter() - t0
    print(f"{len(images)} cases: segplan predict per case {cli_s:.1f} s in all ({cli_s / len(images):.1f} s a case); "
          f"Predictor {api_s:.1f} s in all (loading {load_s:.1f} s once, then "
          f"{(api_s - load_s) / len(images):.1f} s a case)")
    print(json.dumps({"plan": str(a.plan), "cases": results, "cli_total_s": round(cli_s, 1),
                      "api_total_s": round(api_s, 1), "api_load_s": round(load_s, 1)}))


if __name__ == "__main__":
    main()
