"""Prediction settings chosen on the folds for a time per case (`segplan select --seconds-per-case`).

How a trained network predicts is a trade of accuracy against time that nobody measures for the
user: the engine that runs it, how much neighbouring windows overlap (0.5: the paper's and
nnU-Net's; 0.25: about 3.4x fewer windows in 3D), test-time mirroring (up to 8x the network calls)
and how many folds are averaged (5x). Each configuration candidate of `segplan select` (a plan, a
pair) is tried with every combination of the installed engines, the overlaps asked for, mirroring
off and (where the plan mirrors in training) on, and one fold or all:

- scored out of fold: each sampled case predicted by the fold that held it out, with the settings,
  as `segplan predict` would (read, preprocess, sliding window, back to the original grid, the label
  map), its Dice by evaluation's code (selection.case_dice);
- timed on this machine: the mean wall time of those predictions per case, after one untimed call
  of each network (graph tracing, compilation);
- averaging several folds cannot be scored out of fold (every fold but one trained on the case):
  such a candidate is timed on the same cases with folds 0..N-1 and carries the Dice of its
  one-fold counterpart as a lower bound (``dice_lower_bound``), which averaging folds is expected to
  meet or beat.

On a CPU all out-of-fold cases times all candidates is too long for most datasets, so a sample of
them is used (``--cases``, default 20, spread over the folds and drawn with the plans' split seed)
and named in the selection file (``sample``). The same cases serve every candidate, so they are
compared on equal terms.
"""
from __future__ import annotations

import logging
import os
import platform
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from segplan.planner.dataset import read_label
from segplan.planner.dicom import read_case_image
from segplan.planner.labels import LabelModel
from segplan.runner.evaluation.selection_file import PredictionSettings
from segplan.runner.workspace import Workspace

OVERLAPS = (0.5, 0.33, 0.25)   # the examples: half a patch (the paper, nnU-Net), a third, a quarter
SAMPLE = 20                    # out-of-fold cases scored and timed per candidate unless told otherwise


def settings_grid(workspaces: list[Workspace], engines: list[str], overlaps: list[float]) -> list[PredictionSettings]:
    """Every combination of ``engines``, ``overlaps``, mirroring (on only where the training of every
    network involved, a cascade's previous stages included, mirrored often enough for it to help:
    planner.planning.mirroring_prepared; a network that never saw flipped patches gets worse, and
    flipping a structure with a side swaps its labels) and one fold or all, one-fold settings first."""
    from segplan.planner.planning import mirroring_prepared
    from segplan.runner.cascade import stage_chain
    n_folds = workspaces[0].plan.cross_validation.folds
    mirrors = [False] + ([True] if all(mirroring_prepared(ws.plan) for ws, _ in stage_chain(workspaces)) else [])
    folds = [1] + ([n_folds] if n_folds > 1 else [])
    return [PredictionSettings(e, float(o), m, f) for f in folds for e in engines for o in overlaps for m in mirrors]


def sample_cases(ws: Workspace, n: int | None) -> list[tuple[int, str]]:
    """(fold, case id) of ``n`` out-of-fold cases (all with None): taken in turn from each fold's
    validation cases, shuffled by the plan's cross-validation seed, so that every fold is in it."""
    rng = np.random.default_rng(ws.plan.cross_validation.seed)
    per_fold = [list(rng.permutation(sorted(s["val"]))) for s in ws.splits()]
    order = [(k, str(ids[i])) for i in range(max(map(len, per_fold))) for k, ids in enumerate(per_fold)
             if i < len(ids)]
    return sorted(order if n is None else order[:n])


def machine() -> str:
    """The CPU model and its cores, as the seconds' context."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical cores"


def _stages(workspaces: list[Workspace], members: tuple[int, ...], folds: list[int], s: PredictionSettings):
    from segplan.planner.plan import input_channels
    from segplan.runner.inference.stages import workspace_stage
    stages = [workspace_stage(workspaces[i], folds, True, s.inference()) for i in members]
    for first in stages:   # one untimed call per network: Keras traces, OpenVINO compiles on the first
        stage = first
        while stage is not None:    # a cascade's previous stage too; every batch size a case's last call may have
            for b in range(1, stage.plan.inference.batch_size + 1):
                stage.predict(np.zeros((b, input_channels(stage.plan), *stage.plan.training.patch_size), np.float32))
            stage = stage.previous
    return stages


def _predict(stages, case) -> tuple[np.ndarray, float]:
    """The case's label map as `segplan predict` makes it, and the seconds it took."""
    from segplan.runner.inference.stages import predict_with_stages
    t0 = time.perf_counter()
    p = predict_with_stages(stages, lambda: read_case_image(case), case.case_id, case.image_files,
                            training_case=True)
    return p.labels, time.perf_counter() - t0


def search(workspaces: list[Workspace], configurations: dict[str, tuple[int, ...]],
           grids: dict[str, list[PredictionSettings]], sample: list[tuple[int, str]], lm: LabelModel, case_dice,
           progress: bool = True) -> dict:
    """(configuration name, settings) -> {"dice": {class: [per case]}, "seconds": [per case]} for
    every configuration and each setting of its grid (``grids``) on the ``sample`` cases; settings of several folds
    have "seconds" only (their Dice is their one-fold counterpart's). ``case_dice``: (prediction,
    reference, spacing) -> {class: Dice}."""
    # each candidate builds its folds' networks anew: TensorFlow's warning that its predict function
    # was traced again for them is expected here, and said once per candidate would bury the progress
    tf_log = logging.getLogger("tensorflow")
    level = tf_log.level
    tf_log.setLevel(logging.ERROR)
    try:
        return _search(workspaces, configurations, grids, sample, lm, case_dice, progress)
    finally:
        tf_log.setLevel(level)


def _search(workspaces, configurations, grids, sample, lm, case_dice, progress) -> dict:
    cases = {c.case_id: c for c in workspaces[0].dataset.cases}
    refs = {cid: read_label(cases[cid].label_file) for _, cid in sample}
    results: dict = {(name, s): {"dice": {}, "seconds": []} for name, grid in grids.items() for s in grid}
    folds = sorted({k for k, _ in sample})
    for _, cid in sample:   # read once untimed: the first candidate would pay for a cold disk
        for f in (*cases[cid].image_files, cases[cid].label_file):
            Path(f).read_bytes()
    bar = tqdm(total=sum(map(len, grids.values())) * len(sample), desc="select settings", disable=not progress,
               unit="case")
    for name, members in configurations.items():
        for s in grids[name]:
            # one fold: each case by the fold that held it out; several: folds 0..N-1 for every case
            groups = ([([k], [cid for kk, cid in sample if kk == k]) for k in folds] if s.folds == 1
                      else [(list(range(s.folds)), [cid for _, cid in sample])])
            for use, ids in groups:
                stages = _stages(workspaces, members, use, s)
                for cid in ids:
                    labels, seconds = _predict(stages, cases[cid])
                    out = results[(name, s)]
                    out["seconds"].append(seconds)
                    if s.folds == 1:
                        ref, geom = refs[cid]
                        for cls, v in case_dice(labels, ref, geom.spacing).items():
                            out["dice"].setdefault(cls, []).append(v)
                    bar.update()
                del stages
    bar.close()
    return results
