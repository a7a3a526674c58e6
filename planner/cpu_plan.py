"""Plans for a CPU: sized for throughput within a training time budget, not for GPU memory."""
from __future__ import annotations

import dataclasses

from planner.build import make_plan
from planner.fingerprint import Fingerprint
from planner.plan import Plan

CPU_BUDGET_GB = 1.0        # a "memory" budget that keeps the patch small enough for ~1 s steps on 2 cores
DEFAULT_MINUTES = 15.0


def make_cpu_plan(fp: Fingerprint, name: str, dataset_rel: str, work_rel: str, time_budget: float | None = None,
                  splits_file: str | None = None) -> tuple[Plan, dict]:
    plan, reasons = make_plan(fp, name, dataset_rel, work_rel, CPU_BUDGET_GB, "CPU plan: a small budget keeps steps short",
                              preset="cpu", splits_file=splits_file)
    minutes = float(time_budget or DEFAULT_MINUTES)
    sched = dataclasses.replace(plan.training.schedule, time_budget_minutes=minutes)
    plan = plan.replace(training=dataclasses.replace(plan.training, schedule=sched))
    reasons["training.schedule.time_budget_minutes"] = (f"{minutes:g} minutes of training; the learning rate decays "
                                                        "over the budget and the best checkpoint is kept")
    return plan, reasons
