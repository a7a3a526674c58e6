"""A tiny plan for CPU tests: small patches, few filters, a few iterations."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from segplan.planner.plan_file import load_plan, save_plan
from segplan.planner.planning import plan_dataset

# 4 stages (3 are the fewest with a deep-supervision output besides the full-resolution one)
FOUR_STAGES = {"filters": [4, 8, 16, 32], "pool_sizes": [[1, 2, 2], [2, 2, 2], [1, 2, 2]],
               "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]}
# the tiny network and patch of a 3D plan, and of a 2d plan (two in-plane axes)
TINY = {3: ({"filters": [4, 8, 16], "pool_sizes": [[1, 2, 2], [2, 2, 2]],
             "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3]]}, [8, 32, 32]),
        2: ({"filters": [4, 8, 16], "pool_sizes": [[2, 2], [2, 2]], "kernel_sizes": [[3, 3]] * 3}, [32, 32])}
# a GPU budget under which the phantoms' full-resolution patch covers under a quarter of the median
# image, so that a 3d_lowres plan (and a cascade) applies
LOWRES_GPU_GB = 0.9


def tiny_plan(dataset: Path, out: Path, epochs: int = 2, iterations: int = 3, folds: int = 2,
              network: dict | None = None, configuration: str = "3d_fullres", **schedule) -> Path:
    """``network``: NetworkSection fields to set (default: a plain 3-stage 4..16 U-Net without deep
    supervision, 2D for a 2d plan). A 3d_lowres plan is planned for LOWRES_GPU_GB (a CPU plan's patch covers the phantoms)."""
    how = ({"preset": "default", "gpu_memory": LOWRES_GPU_GB} if configuration == "3d_lowres"
           else {"preset": "cpu", "time_budget": None})
    plan_dataset(dataset, out, progress=False, force=True, probe=False, configuration=configuration, **how)
    plan = load_plan(out)
    shape, patch = TINY[len(plan.training.patch_size)]
    net = dataclasses.replace(plan.network, **{**shape, "deep_supervision": False, **(network or {})})
    sched = dataclasses.replace(plan.training.schedule, max_epochs=epochs, iterations_per_epoch=iterations,
                                time_budget_minutes=None, **({"validation_patches": 2} | schedule))
    tr = dataclasses.replace(plan.training, patch_size=patch, batch_size=2, schedule=sched, workers=0)
    plan = plan.replace(network=net, training=tr,
                        cross_validation=dataclasses.replace(plan.cross_validation, folds=folds),
                        inference=dataclasses.replace(plan.inference, mirroring=False))
    save_plan(plan, out)
    return out


def first_case_input(plan_path: Path, folder: Path) -> Path:
    """A prediction input folder holding a copy of the plan's first case's image; returns the copied
    image's source (its name tells the case)."""
    import shutil
    from segplan.runner.workspace import Workspace
    image = Workspace(plan_path).dataset.cases[0].image_files[0].resolve()
    folder.mkdir(parents=True)
    shutil.copy(image, folder / image.name)
    return image
