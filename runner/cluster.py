"""`segplan submit`: a plan's work as jobs through submitit (SLURM, or this machine).

One preprocessing job, one job per fold after it, one summarize job after all folds. On SLURM the
order is the scheduler's (``afterok`` dependencies); the local executor runs the same jobs on this
machine one after another and waits for them. Logs and submitit's files go to WORK/cluster/logs,
the job ids to WORK/cluster/jobs.yaml (read by `segplan status`).

Re-submitting is safe: finished folds are skipped, folds being trained (their lock is held) are
skipped, begun folds resume from their latest checkpoint. A fold job is submitit-checkpointable:
when SLURM's time limit or a preemption signals it, it requeues itself and the requeued job
resumes at the epoch after the last checkpoint.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import yaml

from segplan.planner.fileio import write_yaml
from segplan.runner.locks import is_held
from segplan.runner.workspace import Workspace

EXECUTORS = ("slurm", "local")


@dataclasses.dataclass(frozen=True)
class Resources:
    """What each job asks of the scheduler (`segplan submit` flags)."""
    partition: str | None = None
    gpus_per_job: int = 1
    cpus_per_job: int = 8
    mem_gb: float = 32.0
    hours: float = 24.0


def preprocess_job(plan_path: str) -> str:
    from segplan.runner.preprocessing.preprocess import preprocess_dataset
    ws = Workspace(Path(plan_path))
    out = preprocess_dataset(ws, workers=ws.plan.training.workers or 1, progress=False)
    ws.splits()  # written once, under its lock, before the folds start
    return str(out)


def summarize_job(plan_path: str) -> str:
    from segplan.runner.evaluation.report import summarize
    return summarize(Workspace(Path(plan_path)))


class FoldJob:
    """One fold, trained (resumed where it has a checkpoint), predicted and evaluated. submitit
    calls ``checkpoint`` when the job is about to be stopped (time limit, preemption) and requeues
    what it returns: the same job, which then resumes from the fold's latest checkpoint."""

    def __init__(self, plan_path: str, fold: int, data_parallel: bool = False):
        self.plan_path, self.fold, self.data_parallel = plan_path, fold, data_parallel

    def __call__(self) -> dict:
        from segplan.runner.backend import load_quietly
        from segplan.runner.pipeline import run_fold
        load_quietly()  # the job's log: segplan's lines, not TensorFlow's start-up notices
        ws = Workspace(Path(self.plan_path))
        f = ws.fold(self.fold)
        run_fold(ws, self.fold, resume=f.is_trained(), workers=ws.plan.training.workers or 1, progress=False,
                 data_parallel=self.data_parallel)
        summary = yaml.safe_load(f.validation_summary.read_text())
        return {c: v["dice"]["mean"] for c, v in summary["classes"].items()}

    def checkpoint(self, *args, **kwargs):
        import submitit
        return submitit.helpers.DelayedSubmission(FoldJob(self.plan_path, self.fold, self.data_parallel))


def folds_to_run(ws: Workspace, folds: list[int]) -> tuple[list[int], list[str]]:
    """The requested folds that need a job, and one line for each that does not."""
    todo, skipped = [], []
    for k in folds:
        f = ws.fold(k)
        if f.is_finished() and f.validation_summary.exists():
            skipped.append(f"fold {k}: finished, skipped")
        elif is_held(f.lock):
            skipped.append(f"fold {k}: being trained now, skipped")
        else:
            todo.append(k)
    return todo, skipped


def submit(plan_path: Path, folds: list[int] | None = None, executor: str = "slurm",
           resources: Resources = Resources(), dry_run: bool = False, data_parallel: bool = False) -> list[str]:
    """Submit the plan's jobs; returns the lines to print (ids, log folder, how to follow them)."""
    if executor not in EXECUTORS:
        raise ValueError(f"executor '{executor}': one of {', '.join(EXECUTORS)}")
    plan_path = Path(plan_path).resolve()
    ws = Workspace(plan_path)
    n = ws.plan.cross_validation.folds
    folds = list(range(n)) if folds is None else folds
    bad = [k for k in folds if not 0 <= k < n]
    if bad:
        raise ValueError(f"--folds {bad}: the plan has folds 0..{n - 1}")
    todo, lines = folds_to_run(ws, folds)
    logs = ws.cluster / "logs"
    name = ws.plan.name
    res = _describe(resources, executor)
    if dry_run:
        return lines + [f"would submit ({executor}, logs in {logs}):",
                        f"  segplan-{name}-preprocess: {res['cpu']}",
                        *[f"  segplan-{name}-fold{k}: {res['gpu']}, after preprocess" for k in todo],
                        f"  segplan-{name}-summarize: {res['cpu']}, after " +
                        (f"folds {', '.join(map(str, todo))}" if todo else "preprocess")]
    import submitit
    ex = submitit.AutoExecutor(folder=logs / "%j", cluster=executor)
    jobs: dict[str, object] = {}
    _configure(ex, executor, resources, f"segplan-{name}-preprocess", gpu=False)
    jobs["preprocess"] = ex.submit(preprocess_job, str(plan_path))
    _wait_local(executor, jobs["preprocess"])
    for k in todo:
        _configure(ex, executor, resources, f"segplan-{name}-fold{k}", gpu=True, after=[jobs["preprocess"]])
        jobs[k] = ex.submit(FoldJob(str(plan_path), k, data_parallel))
        _wait_local(executor, jobs[k])
    _configure(ex, executor, resources, f"segplan-{name}-summarize", gpu=False,
               after=[jobs[k] for k in todo] or [jobs["preprocess"]])
    jobs["summarize"] = ex.submit(summarize_job, str(plan_path))
    _wait_local(executor, jobs["summarize"])
    record = {"executor": executor, "submitted": time.strftime("%Y-%m-%d %H:%M:%S"),
              "preprocess": jobs["preprocess"].job_id, "summarize": jobs["summarize"].job_id,
              "folds": {k: jobs[k].job_id for k in todo}}
    write_yaml(ws.cluster / "jobs.yaml", _merged(ws, record), "segplan submit: the latest job of each fold")
    follow = (f"squeue -u $USER; tail -f {logs}/<job id>/<job id>_0_log.out" if executor == "slurm"
              else f"done; logs in {logs}")
    return lines + [f"{label}: job {j.job_id}" for label, j in
                    [("preprocess", jobs["preprocess"])] + [(f"fold {k}", jobs[k]) for k in todo] +
                    [("summarize", jobs["summarize"])]] + [
        f"logs: {logs}", f"follow: segplan status {plan_path}; {follow}"]


def _describe(r: Resources, executor: str) -> dict[str, str]:
    part = f", partition {r.partition}" if r.partition else ""
    return {"gpu": f"{r.gpus_per_job} GPU, {r.cpus_per_job} CPUs, {r.mem_gb:g} GB, {r.hours:g} h{part}",
            "cpu": f"{r.cpus_per_job} CPUs, {r.mem_gb:g} GB, {r.hours:g} h{part}"}


def _configure(ex, executor: str, r: Resources, name: str, gpu: bool, after: list | None = None) -> None:
    params = {"name": name, "timeout_min": int(r.hours * 60), "cpus_per_task": r.cpus_per_job, "mem_gb": r.mem_gb,
              "gpus_per_node": r.gpus_per_job if gpu else 0}
    if executor == "slurm":
        if r.partition:
            params["slurm_partition"] = r.partition
        # afterok: a fold starts only after preprocessing succeeded; a requeued job keeps its id
        params["slurm_additional_parameters"] = (
            {"dependency": "afterok:" + ":".join(j.job_id for j in after)} if after else {})
        if not gpu or r.gpus_per_job == 0:
            params.pop("gpus_per_node")
    ex.update_parameters(**params)


def _wait_local(executor: str, job) -> None:
    """The local executor has no dependencies: its jobs run one after another."""
    if executor == "local":
        job.result()


def _merged(ws: Workspace, record: dict) -> dict:
    """jobs.yaml keeps each fold's latest job, also of folds not in this submission."""
    path = ws.cluster / "jobs.yaml"
    old = yaml.safe_load(path.read_text()) if path.exists() else {}
    return {**record, "folds": {**(old or {}).get("folds", {}), **record["folds"]}}
