"""`segplan status`: where each fold of a plan stands, from the work folder (and the scheduler, if
jobs were submitted to SLURM): not started, submitted / queued, training (epoch, loss, ETA),
finished (Dice) or failed (the last line of its error).

It only reads: a read-only work folder (a colleague's results, a mounted archive) works, and a fold
job that starts meanwhile is never refused because of it (``locks.is_held`` tests a lock, never takes
it; on a platform without open-file-description locks, macOS, it takes it for an instant)."""
from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import yaml

from segplan.runner.locks import holder, is_held
from segplan.runner.evaluation.tables import read_rows
from segplan.runner.workspace import Fold, Workspace


def scheduler_states(job_ids: list[str]) -> dict[str, str]:
    """SLURM's state of each job still known to it (squeue; finished jobs have left it); {} where
    there is no squeue or it cannot be reached."""
    if not job_ids or not shutil.which("squeue"):
        return {}
    try:
        r = subprocess.run(["squeue", "-h", "-o", "%i %T", "-j", ",".join(job_ids)], capture_output=True, text=True,
                           timeout=20)
    except (subprocess.SubprocessError, OSError):
        return {}
    return dict(line.split()[:2] for line in r.stdout.splitlines() if len(line.split()) >= 2)


def fold_status(ws: Workspace, fold: Fold, job: str | None, state: str | None) -> str:
    """One line for one fold."""
    if fold.is_finished() and fold.validation_summary.exists():
        summary = yaml.safe_load(fold.validation_summary.read_text())
        dice = ", ".join(f"{c} {v['dice']['mean']:.3f}" for c, v in summary["classes"].items())
        return f"finished (Dice {dice})"
    if is_held(fold.lock):
        return f"training{_progress(ws, fold)} [{holder(fold.lock)}]"
    if state in ("PENDING", "CONFIGURING"):
        return f"queued (job {job})"
    if state in ("RUNNING", "COMPLETING"):
        return f"starting (job {job} running)"
    if fold.failed.exists():
        return f"failed: {fold.failed.read_text().strip()}"
    if job is not None:
        err = _last_error(ws, job)
        if err:
            return f"failed (job {job}): {err}"
    if fold.is_trained():
        return f"stopped{_progress(ws, fold)}; `segplan run --resume` or `segplan submit` continues it"
    return "not started" + (f" (job {job} submitted)" if job else "")


def status(plan_path: Path) -> str:
    ws = Workspace(Path(plan_path))
    jobs_file = ws.cluster / "jobs.yaml"
    jobs = yaml.safe_load(jobs_file.read_text()) if jobs_file.exists() else {}
    fold_jobs = {int(k): str(v) for k, v in (jobs or {}).get("folds", {}).items()}
    states = scheduler_states(list(fold_jobs.values())) if (jobs or {}).get("executor") == "slurm" else {}
    lines = [f"{ws.plan.name}: work folder {ws.root}" + (f"; jobs submitted {jobs['submitted']} ({jobs['executor']})"
                                                           if jobs else "")]
    for fold in ws.folds():
        job = fold_jobs.get(fold.index)
        lines.append(f"  fold {fold.index}: {fold_status(ws, fold, job, states.get(job))}")
    if ws.cv_summary_md.exists():
        lines.append(f"  cross-validation summary: {ws.cv_summary_md}")
    return "\n".join(lines)


def _progress(ws: Workspace, fold: Fold) -> str:
    """' (epoch N, loss x, ETA ...)' from the fold's history and its plan's schedule."""
    rows = read_rows(fold.history) if fold.history.exists() else []
    if not rows:
        return " (first epoch)"
    last = rows[-1]
    sched = ws.plan.training.schedule
    epoch_s = sum(float(r["seconds"]) for r in rows) / len(rows)
    left = (sched.max_epochs - len(rows)) * epoch_s
    if sched.time_budget_minutes is not None:
        left = min(left, sched.time_budget_minutes * 60 - sum(float(r["seconds"]) for r in rows))
    eta = "" if math.isnan(left) else f", ETA {_duration(max(0.0, left))} at most"
    return f" (epoch {int(last['epoch']) + 1}, loss {float(last['train_loss']):.4f}{eta})"


def _duration(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.0f} min"


def _last_error(ws: Workspace, job: str) -> str | None:
    """The last line of a job's error log (submitit's %j folder), if the job wrote one."""
    for log in (ws.cluster / "logs" / job).glob("*_log.err") if (ws.cluster / "logs" / job).is_dir() else []:
        lines = [l for l in log.read_text(errors="replace").splitlines() if l.strip()]
        if lines and ("Error" in lines[-1] or "Exception" in lines[-1]):
            return lines[-1].strip()
    return None
