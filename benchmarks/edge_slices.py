"""Edge slices lost by the inverse resampling (issue 10): how many original slices, rows or columns
of the phantoms' geometries come back as background when every resampled voxel says "foreground".

For each of N phantom geometries (the shapes and spacings `segplan make-phantoms` draws, full size
by default; no image is made) and each axis, a volume that is one class everywhere is taken to the
target spacing and back with segplan.runner.preprocessing.preprocess's inverse; every original index along the axis where
the voxel on the central line of the other two axes is not that class counts as lost. The other two
axes are kept 8 voxels thin: the grids are separable, so what is lost along one axis does not
depend on the others' length.

    python benchmarks/edge_slices.py [--cases 20] [--scale 1.0] [--spacing 2.70 1.58 1.58]
"""
from __future__ import annotations

import argparse
from types import SimpleNamespace

import numpy as np

from segplan.datasets.phantoms import make_spec
from segplan.planner.dataset import Geometry
from segplan.planner.plan import ResamplingSection
from segplan.runner.preprocessing.inversion import invert_probabilities
from segplan.runner.preprocessing.resampling import target_shape


def lost_along(shape, spacing, target, axis: int) -> int:
    thin = [8, 8, 8]
    thin[axis] = shape[axis]
    new_shape = target_shape(thin, spacing, target)
    probs = np.zeros((2, *new_shape), np.float32)
    probs[1] = 1.0
    geom = Geometry(tuple(spacing), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), tuple(thin))
    props = {"geometry": geom.to_dict(), "crop_box": [[0, s] for s in thin], "cropped_shape": thin}
    plan = SimpleNamespace(resampling=ResamplingSection(list(target), 3, "onehot_linear", 3.0, 0))
    classes = invert_probabilities(probs, props, plan, full=False)
    centre = tuple(slice(None) if a == axis else 4 for a in range(3))  # the thin axes' own edges aside
    return int(np.count_nonzero(classes[centre] != 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--spacing", type=float, nargs=3, default=[2.70, 1.58, 1.58], help="target spacing z y x (mm)")
    args = ap.parse_args()
    total, cases_hit = [0, 0, 0], 0
    for i in range(args.cases):
        spec = make_spec(args.seed, i, args.scale)
        lost = [lost_along(spec.shape, spec.spacing, args.spacing, a) for a in range(3)]
        total = [t + v for t, v in zip(total, lost)]
        cases_hit += any(lost)
        print(f"{spec.case_id}: shape {spec.shape} spacing {tuple(round(s, 3) for s in spec.spacing)} "
              f"-> lost slices z/rows y/columns x: {lost}")
    print(f"{args.cases} phantoms to {args.spacing} mm and back: lost {total[0]} slices, {total[1]} rows, "
          f"{total[2]} columns; {cases_hit} cases lose something")


if __name__ == "__main__":
    main()
