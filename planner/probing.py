"""Measure instead of estimate: run ``python -m segplan.runner.training.probe`` in a child process (the planner never
imports TensorFlow, and every measurement starts from an empty GPU) and, for GPU plans, fit the
patch and batch to the budget by measured peaks rather than by the memory model alone.

The GPU search (``segplan plan --probe``): plan with the model, measure the planned step's peak,
rescale the budget the model is given by measured/estimated, re-plan, measure again; keep the
largest plan whose measured peak stays within the budget less ``PROBE_MARGIN``. A few probes at
most (``MAX_GPU_PROBES``), so it always ends; the figures go into the plan's comments.
"""
from __future__ import annotations

import json
import subprocess
import sys
from typing import Callable

from segplan.planner.memory import estimate_for_plan
from segplan.planner.plan import Plan, input_channels
from segplan.planner.schema import to_plain

PROBE_TIMEOUT_S = 300
PROBE_MARGIN = 0.10      # the measured peak may use the budget less this share (CUDA context, fragmentation)
MAX_GPU_PROBES = 4
CLOSE_ENOUGH = 0.85      # a measured peak at this share of the target or above is not grown further
OOM_SHRINK = 0.6         # the model's budget after an out-of-memory probe (no peak to rescale by)
REPLAN_STEP = 0.9        # when a rescaled budget gives the plan already measured too large: this much smaller ...
MAX_REPLANS = 30         # ... at most this many times (the smallest plan the rules allow stops it)


def run_probe(candidates: list[dict], network: dict, loss: dict, in_channels: int, n_classes: int, steps: int = 3,
              mixed_precision: bool = False, stop_above: dict | None = None) -> tuple[list[dict] | None, str]:
    """Per candidate {seconds, window_seconds, peak_gb, oom} from ``python -m segplan.runner.training.probe`` with the
    plan's own network settings and loss; (None, why) when the probe failed (its error's last line).
    ``stop_above``: the candidates are measured in order up to the first whose ``seconds`` or
    ``window_seconds`` exceed these limits (the list returned is then shorter)."""
    spec = {"candidates": candidates, "network": network, "loss": loss, "in_channels": in_channels,
            "n_classes": n_classes, "steps": steps, "mixed_precision": mixed_precision, "stop_above": stop_above}
    return _child("segplan.runner.training.probe", spec)


def run_engine_probe(network: dict, patch: list[int], batch: int, in_channels: int, n_outputs: int,
                     activation: str) -> tuple[dict | None, str]:
    """Seconds per network call of ``batch`` windows on every installed inference engine, their
    largest difference from Keras and the engines not installed (``python -m
    segplan.runner.inference.engine_probe``); (None, why) when the probe failed."""
    return _child("segplan.runner.inference.engine_probe",
                  {"network": network, "patch": patch, "batch": batch, "in_channels": in_channels,
                   "n_outputs": n_outputs, "activation": activation})


def _child(module: str, spec: dict) -> tuple[object, str]:
    """Run ``python -m module SPEC_JSON`` and read the JSON its last line prints; (None, why) on failure."""
    try:
        r = subprocess.run([sys.executable, "-m", module, json.dumps(spec)], capture_output=True, text=True,
                           timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None, f"the probe took over {PROBE_TIMEOUT_S} s"
    except OSError as e:
        return None, f"the probe could not start ({e})"
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no error output"])[-1]
        return None, f"the probe failed: {last}"
    try:
        return json.loads(r.stdout.strip().splitlines()[-1]), ""
    except (json.JSONDecodeError, IndexError):
        return None, f"the probe printed no figures: {r.stdout.strip()[-200:]!r}"


def candidate(plan: Plan) -> dict:
    net, tr = plan.network, plan.training
    return {"filters": net.filters, "pool_sizes": net.pool_sizes, "kernel_sizes": net.kernel_sizes,
            "blocks_per_stage": net.blocks_per_stage, "patch": tr.patch_size, "batch": tr.batch_size}


def measure_plan(plan: Plan) -> tuple[dict | None, str]:
    """The planned training step measured in a child process: {seconds, peak_gb, oom}, or (None, why)."""
    out, why = run_probe([candidate(plan)], to_plain(plan.network), to_plain(plan.training.loss),
                         input_channels(plan), len(plan.dataset.labels),
                         mixed_precision=plan.training.mixed_precision)
    return (out[0], "") if out else (None, why)


def fit_by_probe(replan: Callable[[float], tuple[Plan, dict]], budget_gb: float,
                 measure: Callable[[Plan], tuple[dict | None, str]] = measure_plan
                 ) -> tuple[Plan, dict, float | None, list[str]]:
    """Re-plan (``replan(model_budget_gb)``) until a measured peak fits ``budget_gb`` less the margin.

    Returns the chosen plan, its reasons, its measured peak (None: nothing fitted) and one line per
    probe. The model budget is rescaled by
    target / measured after each probe (the model's shape is right, its scale is what the probe
    corrects); an out-of-memory probe shrinks it by OOM_SHRINK. Without any measurement (the probe
    failed), the first plan is kept with the probe's error in ``lines``."""
    target = budget_gb * (1 - PROBE_MARGIN)
    model_budget = budget_gb
    best, fallback, lines = None, None, []
    seen: dict[tuple, float | None] = {}   # (patch, batch) -> measured peak (None: out of memory)
    for _ in range(MAX_GPU_PROBES):
        plan, reasons = replan(model_budget)
        key = (tuple(plan.training.patch_size), plan.training.batch_size)
        for _ in range(MAX_REPLANS):  # the rescaled budget gave a plan already measured too large: a step smaller
            if key not in seen or (seen[key] is not None and seen[key] <= target):
                break
            model_budget *= REPLAN_STEP
            plan, reasons = replan(model_budget)
            key = (tuple(plan.training.patch_size), plan.training.batch_size)
        if key in seen:
            break  # the model budget no longer changes the plan: nothing new to measure
        fallback = fallback or (plan, reasons)
        m, why = measure(plan)
        est = estimate_for_plan(plan)
        seen[key] = None if m is None or m["oom"] else m["peak_gb"]
        if m is None:
            lines.append(f"patch {plan.training.patch_size} x batch {plan.training.batch_size}: {why}")
            break
        if m["oom"]:
            lines.append(f"patch {plan.training.patch_size} x batch {plan.training.batch_size}: out of memory")
            model_budget *= OOM_SHRINK
            continue
        peak = m["peak_gb"]
        lines.append(f"patch {plan.training.patch_size} x batch {plan.training.batch_size}: measured {peak:.2f} GB "
                     f"peak (model {est:.2f} GB), {m['seconds']:.3f} s/step")
        if peak <= target and (best is None or peak > best[2]):
            best = (plan, reasons, peak)
        if peak <= target and peak >= CLOSE_ENOUGH * target:
            break
        model_budget *= target / peak
    if best is not None:
        return best[0], best[1], round(best[2], 2), lines
    plan, reasons = fallback
    lines.append(f"DOES NOT FIT: no probed plan stayed within {target:.2f} GB; kept the model's plan")
    return plan, reasons, None, lines
