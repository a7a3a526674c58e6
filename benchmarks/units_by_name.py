"""Does a new image's name change its segmentation? (issue 19, point 1)

One phantom CT in HU is given to prediction twice: named like one of the plan's windowed (0..255)
training cases, and under a name no training case has. Its unit must come from its own values, so
the two inputs must be the same. Printed: the voxels of the preprocessed network input that differ
between the two names, and with ``--train`` (a tiny plan trained for a few iterations on the CPU,
then `segplan predict` on the two files) the voxels whose predicted label differs.

    PYTHONPATH=$PWD python benchmarks/units_by_name.py [--train] [--epochs 4] [--iterations 10]

Runs against whichever segplan is on PYTHONPATH, so the same script measures before and after.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np

from segplan.datasets.phantoms import make_phantoms
from segplan.planner.layouts import load_dataset
from segplan.planner.dataset import read_image, read_label
from segplan.planner.plan_file import load_plan
from segplan.planner.planning import plan_dataset
from segplan.runner.preprocessing.preprocess import preprocess_image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", action="store_true", help="also train a tiny plan and compare predicted labels")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--iterations", type=int, default=10)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="units_by_name_") as tmp:
        tmp = Path(tmp)
        ds = make_phantoms(tmp / "ds", cases=8, seed=3, scale=0.12, progress=False)  # the tests' phantoms
        plan_path = plan_dataset(ds, tmp / "plans" / "p.yaml", gpu_memory=4, progress=False)
        plan = load_plan(plan_path)
        conv = plan.intensity.conventions
        windowed = next(c for c, v in sorted(conv.items()) if v == "windowed")
        hu_case = next(c for c in load_dataset(ds).cases if conv.get(c.case_id) == "hu")
        image, geom = read_image(hu_case)
        print(f"HU phantom {hu_case.case_id} ({image.min():g}..{image.max():g}), "
              f"{int(np.prod(image.shape[1:]))} voxels; named like windowed training case {windowed} vs 'new_case'")
        # preprocess_image as `segplan predict` calls it (the case id is the file's name)
        as_windowed = preprocess_image(image.copy(), geom, plan, windowed)[0]
        as_new = preprocess_image(image.copy(), geom, plan, "new_case")[0]
        print(f"preprocessed input: {int(np.count_nonzero(as_windowed != as_new))} of {as_new.size} voxels differ "
              f"(max |difference| {float(np.abs(as_windowed - as_new).max()):.3g})")
        if not a.train:
            return
        from segplan.runner.cli import main as segplan
        from tests.tiny import tiny_plan
        tiny_plan(ds, plan_path, epochs=a.epochs, iterations=a.iterations)
        assert segplan(["run", str(plan_path), "--fold", "0"]) == 0
        inp = tmp / "in"
        inp.mkdir()
        for name in (windowed, "new_case"):
            shutil.copy(hu_case.image_files[0], inp / f"{name}_0000.nii.gz")
        assert segplan(["predict", str(plan_path), "-i", str(inp), "-o", str(tmp / "out"), "--folds", "0"]) == 0
        x = read_label(tmp / "out" / f"{windowed}.nii.gz")[0]
        y = read_label(tmp / "out" / "new_case.nii.gz")[0]
        print(f"predicted labels: {int(np.count_nonzero(x != y))} of {x.size} voxels differ "
              f"(foreground voxels: {int(np.count_nonzero(x))} as {windowed}, {int(np.count_nonzero(y))} as new_case)")


if __name__ == "__main__":
    main()
