"""Plans for a CPU: sized for throughput within a training time budget, not for GPU memory.

A plan fitted to GPU memory is the wrong plan on a laptop: nnU-Net's own plan for Hippocampus runs
at 10.5 s per iteration on 2 cores and learns nothing in 15 minutes. Here the patch follows the
median image (as on a GPU, but with a small memory proxy so steps stay short), and the network
width is chosen by a probe that times a few training steps of the candidates on this machine,
narrowest first up to the first too slow: the widest network that still buys ``MIN_ITERATIONS``
iterations within the budget wins. The probe runs
in a separate process (``segplan.runner.training.probe``), so the planner itself never imports TensorFlow.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from segplan.planner import heuristics as H
from segplan.planner.augmentation import MIRROR_TTA_WHY
from segplan.planner.build import make_plan, supervision_note
from segplan.planner.fingerprint import Fingerprint
from segplan.planner.labels import label_model
from segplan.planner.orientation import in_majority_orientation
from segplan.planner.memory import estimate_cpu_run_gb
from segplan.planner.plan import Plan, input_channels, volume_patch
from segplan.planner.probing import run_engine_probe, run_probe
from segplan.planner.schema import to_plain

CPU_BUDGET_GB = 1.0        # memory proxy that keeps the patch near the median image and steps short
MIN_COVER = 0.85           # the patch rounds the median image down to the pooling while it covers this much of it
DEFAULT_MINUTES = 15.0
WIDTHS = (8, 16, 32)       # first-stage filters of the candidates; each doubles up to WIDTH_GROWTH x
WIDTH_GROWTH = 8
MIN_ITERATIONS = 1500      # on Hippocampus, ~2000 iterations of batch 2 reached Dice 0.87 (5-minute run)
USABLE_SHARE = 0.85        # share of the budget spent in training steps (validation, checkpoints: the rest)
VALIDATION_SHARE = 0.01   # validation patches: at most this share of the training time
EPOCH_SECONDS = 5.0        # epochs this long: frequent best-checkpoint decisions at a small overhead
PROBE_STEPS = 3            # timed steps per candidate, after one warm-up step
MAX_CASE_SECONDS = 120.0   # a CPU plan predicts a median case within 2 minutes (inference weighs on the width)
FALLBACK_ITERATIONS = 25   # without probe figures: epochs of this many iterations ...
FALLBACK_VALIDATION_EVERY = 5
ENGINE_TOLERANCE = 1e-3     # an engine whose output differs from Keras' by more than this is not chosen
MAX_EPOCHS = 10_000        # the time budget, not the epoch count or early stopping, ends a CPU run
EARLY_STOPPING_WHY = ("off (as many epochs as max_epochs): the learning rate decays over the time budget, so a stop "
                      "before its end keeps weights trained at a high learning rate, and the training loss of "
                      "few-second epochs is noisy (a 5-minute Hippocampus run with a 32x48x32 patch stopped at 53% of "
                      "its budget, learning rate 5.5e-4, after 20 epochs without a new lowest loss)")
# Deep supervision on a CPU, decided by benchmarks/deep_supervision.py (Hippocampus fold 0, on vs off
# at the same time budget). The text is the plan's comment on the choice: change the two together
DEEP_SUPERVISION = False
DEEP_SUPERVISION_WHY = ("off: on Hippocampus fold 0 it was a wash at 5 minutes (0.867 / 0.850 on, 0.862 / 0.853 "
                        "off, 4% slower steps) and at 15 minutes (0.890 / 0.874 on, 0.886 / 0.871 off, within "
                        "run-to-run noise; benchmarks/deep_supervision.py), so the cheaper network; set true to try")


# The patch rounded down on a CPU, measured by benchmarks/plan_variants.py (Hippocampus fold 0, 5 minutes)
PATCH_WHY = ("padding voxels cost step time and teach nothing: on Hippocampus fold 0 at 5 minutes 32x48x32 x batch "
             "3, which the proxy gives, reached Dice 0.889 / 0.872 and 0.888 / 0.872 in two runs, against 0.874 / 0.862 "
             "for the median rounded up, 40x56x40 x batch 2; batch 2 0.881 / 0.867, batch 4 0.883 / 0.870")


# 2D against 3D on a CPU, measured by benchmarks/configurations.py (Hippocampus fold 0, both at one
# budget). The text is a 3d_fullres CPU plan's comment on its configuration
CONFIGURATION_WHY = ("CPU plans are 3d_fullres unless --configuration (or --configurations all) asks for another: "
                     "2d was ahead at 3 minutes on Hippocampus fold 0 (Dice 0.839 / 0.834 against 0.827 / 0.824, the "
                     "two averaged 0.855 / 0.848; one run on a loaded 2-core machine) and behind at 5 minutes (0.870 / "
                     "0.858 against 0.876 / 0.862; their ensemble 0.885 / 0.870 costs twice the training time; "
                     "benchmarks/configurations.py)")


def choose_width(seconds: list[float], budget_s: float, case_seconds: list[float] | None = None) -> int:
    """Index of the widest candidate reaching MIN_ITERATIONS in the budget and predicting a median
    case within MAX_CASE_SECONDS (the fastest to train if none does)."""
    ok = [i for i, s in enumerate(seconds) if fits(s, budget_s, None if case_seconds is None else case_seconds[i])]
    return max(ok) if ok else min(range(len(seconds)), key=lambda i: seconds[i])


def fits(step_s: float, budget_s: float, case_s: float | None = None) -> bool:
    """A width trains MIN_ITERATIONS in the budget and predicts a median case within MAX_CASE_SECONDS."""
    return budget_s * USABLE_SHARE / step_s >= MIN_ITERATIONS and (case_s is None or case_s <= MAX_CASE_SECONDS)


def make_cpu_plan(fp: Fingerprint, name: str, dataset_rel: str, work_rel: str, time_budget: float | None = None,
                  splits_file: str | None = None, probe: bool = True, why: str = "",
                  memory_gb: float = CPU_BUDGET_GB, configuration: str = "3d_fullres") -> tuple[Plan, dict]:
    """The GPU rules with a small memory proxy for the patch (``memory_gb``), then every CPU rule:
    narrow networks, the width the probe picks, a training time budget, no mirroring at inference."""
    plan, reasons = make_plan(fp, name, dataset_rel, work_rel, memory_gb,
                              "CPU plan: a small memory proxy keeps steps short", splits_file=splits_file,
                              first=WIDTHS[0], cap=WIDTHS[0] * WIDTH_GROWTH, configuration=configuration,
                              min_cover=MIN_COVER)
    fp = in_majority_orientation(fp)   # the case sizes below: of the arrays the network sees (make_plan's too)
    minutes = float(time_budget or DEFAULT_MINUTES)
    tr = plan.training
    net = dataclasses.replace(plan.network, deep_supervision=DEEP_SUPERVISION)
    n_stages = len(net.filters)
    candidates = [{"filters": H.filters_for(n_stages, w, WIDTH_GROWTH * w), "pool_sizes": net.pool_sizes,
                   "kernel_sizes": net.kernel_sizes, "blocks_per_stage": net.blocks_per_stage, "patch": tr.patch_size,
                   "batch": tr.batch_size} for w in WIDTHS]
    windows = H.window_count(H.median_resampled_shape(fp, plan.resampling.target_spacing),
                             volume_patch(tr.patch_size, plan.slice_axis), plan.inference.overlap)
    # narrowest first, up to the first too slow to train MIN_ITERATIONS or to predict a case in time
    limits = {"seconds": minutes * 60 * USABLE_SHARE / MIN_ITERATIONS, "window_seconds": MAX_CASE_SECONDS / windows}
    measured, failed = (run_probe(candidates, to_plain(net), to_plain(tr.loss), input_channels(plan),
                                  len(fp.regions) or len(fp.labels), steps=PROBE_STEPS, stop_above=limits)
                        if probe else (None, "no probe run (probe=False)"))
    if measured and any(m["oom"] for m in measured):
        measured, failed = None, "the probe ran out of memory"
    seconds = [m["seconds"] for m in measured] if measured else None
    if seconds:
        case_s = [windows * m["window_seconds"] for m in measured]
        pick = choose_width(seconds, minutes * 60, case_s)
        figures = ", ".join(f"{c['filters'][0]}..{max(c['filters'])} filters {s:.2f} s/step "
                            f"(~{int(minutes * 60 * USABLE_SHARE / s)} iterations), {p:.1f} s per median case"
                            for c, s, p in zip(candidates, seconds, case_s))
        unmeasured = [f"{c['filters'][0]}.." for c in candidates[len(measured):]]
        skipped = (f" (wider candidates, {', '.join(unmeasured)}, not probed: slower still)" if unmeasured else "")
        choice = (f"chose the widest reaching {MIN_ITERATIONS} iterations in {minutes:g} min and predicting a median "
                  f"case within {MAX_CASE_SECONDS:g} s" if fits(seconds[pick], minutes * 60, case_s[pick]) else
                  f"none reaches {MIN_ITERATIONS} iterations in {minutes:g} min and predicts a median case within "
                  f"{MAX_CASE_SECONDS:g} s: chose the fastest to train (a longer budget buys more iterations)")
        reasons["network.filters"] = (f"probe on this machine, patch {tr.patch_size} x batch {tr.batch_size}: {figures}"
                                      f"{skipped}; {choice}")
        reasons["inference.overlap"] = (f"a median case is {windows} windows of {tr.patch_size}: about "
                                        f"{case_s[pick]:.1f} s of network time to predict on this machine (probe, "
                                        f"{measured[pick]['window_seconds']:.2f} s per window, no mirroring)")
        step_s = seconds[pick]
    else:
        pick, step_s = 0, None
        reasons["network.filters"] = f"{failed}: the narrowest candidate ({WIDTHS[0]} doubling to {WIDTHS[0] * WIDTH_GROWTH})"
    net = dataclasses.replace(net, filters=candidates[pick]["filters"])
    reasons["network.deep_supervision"] = f"{DEEP_SUPERVISION_WHY}; {supervision_note(net)}"
    iters = max(10, int(round(EPOCH_SECONDS / step_s))) if step_s else FALLBACK_ITERATIONS
    val_s = tr.schedule.validation_patches * measured[pick]["window_seconds"] if step_s else None
    every = max(1, math.ceil(val_s / (VALIDATION_SHARE * step_s * iters))) if step_s else FALLBACK_VALIDATION_EVERY
    sched = dataclasses.replace(tr.schedule, time_budget_minutes=minutes, iterations_per_epoch=iters,
                                max_epochs=max(tr.schedule.max_epochs, MAX_EPOCHS),
                                early_stopping_patience=max(tr.schedule.max_epochs, MAX_EPOCHS),
                                validation_every=every)
    reasons["training.schedule.validation_every"] = (
        f"{tr.schedule.validation_patches} validation patches take about {val_s:.2f} s on this machine (probe): "
        f"every {every} epochs keeps them within {VALIDATION_SHARE:.0%} of the training time; the training loss, "
        "not the validation, drives the schedule" if step_s else
        f"no probe figures: every {every} epochs; the training loss, not the validation, drives the schedule")
    reasons["training.schedule.early_stopping_patience"] = EARLY_STOPPING_WHY
    engine = choose_engine(plan, net, probe, reasons)
    plan = plan.replace(preset="cpu", device="cpu", network=net,
                        training=dataclasses.replace(tr, schedule=sched, workers=0),
                        inference=dataclasses.replace(plan.inference, mirroring=False, engine=engine))
    plan = plan.replace(memory=dataclasses.replace(plan.memory, estimate_gb=_run_memory(plan, fp, reasons)))
    if configuration == "3d_fullres":
        reasons["configuration"] = f"{CONFIGURATION_WHY}. {reasons.get('configuration', '3d_fullres')}"
    reasons["training.schedule.time_budget_minutes"] = (f"{minutes:g} minutes of training{why}; the learning rate "
                                                        "decays over the budget and the final weights are evaluated")
    if step_s:
        reasons["training.schedule.iterations_per_epoch"] = f"epochs of about {EPOCH_SECONDS:g} s at {step_s:.2f} s/step"
    reasons["training.schedule.max_epochs"] = "the time budget, not the epoch count, ends a CPU run"
    reasons["training.patch_size"] = (f"the median image made divisible by the pooling, rounded down where the patch "
                                      f"still covers {MIN_COVER:.0%} of each axis ({PATCH_WHY}), shrunk only to keep "
                                      f"CPU steps short ({memory_gb:g} GB memory proxy, which also sets the batch)")
    reasons["inference.mirroring"] = f"off: {MIRROR_TTA_WHY}; on a CPU it would also multiply the prediction time by 8"
    reasons["training.workers"] = ("0, a thread: on a CPU the training step needs the cores, and small batches cost "
                                   "more to send between processes than to make (benchmarks/batch_pipeline.py)")
    return plan, reasons


def choose_engine(plan: Plan, net, probe: bool, reasons: dict) -> str:
    """The fastest installed inference engine for the planned network, measured on this machine (one
    network call of ``inference.batch_size`` windows, in a child process); keras without a probe,
    or where no other engine is installed or agrees with Keras to ENGINE_TOLERANCE."""
    if not probe:
        reasons["inference.engine"] = "keras: not measured (no probe run); onnxruntime or openvino may be faster here"
        return "keras"
    lm = label_model(plan)
    window = volume_patch(plan.training.patch_size, plan.slice_axis)
    found, failed = run_engine_probe(to_plain(net), plan.training.patch_size, plan.inference.batch_size,
                                     input_channels(plan), lm.n_outputs, lm.activation)
    if not found or "keras" not in found["seconds"]:
        reasons["inference.engine"] = f"keras: {failed or 'the engine probe measured nothing'}"
        return "keras"
    secs, diff = found["seconds"], found["max_difference"]
    agree = {e: s for e, s in secs.items() if diff.get(e, 0.0) <= ENGINE_TOLERANCE}
    best = min(agree, key=agree.get)
    figures = ", ".join(f"{e} {s:.3f} s" + (f" (differs from keras by {diff[e]:.1e}: not used)"
                                            if e not in agree else "") for e, s in secs.items())
    absent = "; not installed: " + ", ".join(found["not_installed"]) + " (pip install 'segplan[cpu]')" \
        if found["not_installed"] else ""
    reasons["inference.engine"] = (f"measured on this machine, one call of {plan.inference.batch_size} windows of "
                                   f"{window}: {figures}; {best}, the fastest ({secs['keras'] / secs[best]:.1f}x "
                                   f"keras){absent}")
    return best


def _run_memory(plan: Plan, fp: Fingerprint, reasons: dict) -> float:
    """What a user's machine needs: the peak of the whole `segplan run` (planner/memory.py)."""
    at_target = H.case_voxels(fp, plan.resampling.target_spacing)
    total, parts = estimate_cpu_run_gb(plan, sum(at_target), max(at_target),
                                       max(float(np.prod(c.shape)) for c in fp.cases))
    reasons["memory.estimate_gb"] = ("peak memory of the whole `segplan run` on this CPU: "
                                     + ", ".join(f"{k} {v:.2f} GB" for k, v in parts.items())
                                     + " (training: the model fitted to benchmarks/results/cpu_memory.json)")
    return round(total, 2)
