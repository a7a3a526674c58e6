"""Learning-rate schedule, plateau reduction and early stopping as pure functions of a small state,
so a checkpoint can store the state and a resumed run continues exactly where it stopped."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from segplan.planner.plan import ScheduleSection


@dataclass(frozen=True)
class TrainState:
    epoch: int = 0                   # epochs completed
    learning_rate: float = 1e-3
    best: float = math.inf           # best monitored value so far (lower is better)
    best_epoch: int = -1
    plateau_wait: int = 0
    stop_wait: int = 0
    cooldown: int = 0
    elapsed_s: float = 0.0           # training seconds across resumes (time budgets)
    stopped: str = ""                # why training ended, once it has
    lr_history: list = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["best"] = None if math.isinf(self.best) else self.best
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        d = dict(d)
        d["best"] = math.inf if d.get("best") is None else d["best"]
        return cls(**d)


def budget_learning_rate(initial: float, minimum: float, elapsed_s: float, budget_min: float) -> float:
    """Polynomial decay (power 0.9, as nnU-Net) laid over the time budget instead of the epochs."""
    frac = min(max(elapsed_s / (budget_min * 60.0), 0.0), 1.0)
    return max(initial * (1.0 - frac) ** 0.9, minimum)


def after_epoch(state: TrainState, value: float, sched: ScheduleSection) -> tuple[TrainState, bool]:
    """Account for one finished epoch whose monitored value is ``value``; returns (state, improved).

    Plateau: after ``plateau_patience`` epochs without an improvement of at least ``plateau_min_delta``
    the learning rate is multiplied by ``plateau_factor`` (not below the minimum), then ``cooldown``
    epochs pass before counting again. Early stopping after ``early_stopping_patience`` such epochs.
    With a time budget the plateau rule is off: the learning rate follows the budget.
    """
    improved = value < state.best - sched.plateau_min_delta
    s = replace(state, epoch=state.epoch + 1, lr_history=state.lr_history + [state.learning_rate])
    if improved:
        s = replace(s, best=value, best_epoch=state.epoch, plateau_wait=0, stop_wait=0)
    else:
        s = replace(s, stop_wait=s.stop_wait + 1)
        if s.cooldown > 0:
            s = replace(s, cooldown=s.cooldown - 1)
        else:
            s = replace(s, plateau_wait=s.plateau_wait + 1)
    if sched.time_budget_minutes is None and s.plateau_wait >= sched.plateau_patience:
        new_lr = max(s.learning_rate * sched.plateau_factor, sched.min_learning_rate)
        s = replace(s, learning_rate=new_lr, plateau_wait=0, cooldown=sched.plateau_cooldown)
    return replace(s, stopped=stop_reason(s, sched)), improved


def stop_reason(s: TrainState, sched: ScheduleSection) -> str:
    """Why training should stop now ('' to go on); re-evaluated on resume, so raising max_epochs or
    the time budget in the plan lets a finished run continue."""
    if s.stop_wait >= sched.early_stopping_patience:
        return f"early stopping: no improvement for {s.stop_wait} epochs"
    if s.epoch >= sched.max_epochs:
        return f"reached max_epochs = {sched.max_epochs}"
    if sched.time_budget_minutes is not None and s.elapsed_s >= sched.time_budget_minutes * 60:
        return f"time budget of {sched.time_budget_minutes:g} min spent"
    return ""
