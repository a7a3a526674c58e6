"""Beyond one process (issue 14): locks on a shared work folder, `segplan status` from the work
folder alone, and `segplan submit` through submitit's local executor (the SLURM executor is tested
on a real one-node cluster in tests/cluster/test_slurm.py)."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from runner.locks import Busy, exclusive, hold, holder, is_held
from tests.tiny import tiny_plan

ROOT = Path(__file__).resolve().parents[1]


def _holding(path: Path, seconds: float = 60) -> subprocess.Popen:
    """Another process that takes the lock at ``path`` and keeps it (until killed)."""
    code = (f"import time; from runner.locks import hold\n"
            f"with hold({str(path)!r}, 'test'):\n    print('held', flush=True); time.sleep({seconds})")
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_held_lock_refuses_naming_its_holder_and_a_dead_holder_is_stale(tmp_path, capsys):
    lock = tmp_path / "x.lock"
    p = _holding(lock)
    try:
        assert is_held(lock)
        with pytest.raises(Busy, match=rf"pid {p.pid}"):
            with hold(lock, "fold 0"):
                pass
    finally:
        p.kill()
        p.wait()
    # killed while holding: its line is still in the file, but the lock went with the process
    assert f"pid {p.pid}" in holder(lock) and not is_held(lock)
    with hold(lock, "fold 0"):
        assert "took over a stale lock" in capsys.readouterr().out
    assert holder(lock) is None  # released cleanly: nothing left to look stale


def test_exclusive_waits_for_the_holder(tmp_path):
    lock = tmp_path / "y.lock"
    p = _holding(lock, seconds=1.5)
    t = time.perf_counter()
    with exclusive(lock, "cache"):
        waited = time.perf_counter() - t
    p.wait()
    assert waited > 0.5


def test_two_preprocessing_processes_write_each_case_once(phantoms, tmp_path):
    plan = tiny_plan(phantoms, tmp_path / "plans" / "t.yaml")
    log = tmp_path / "written.txt"
    code = ("import sys; from pathlib import Path; import runner.preprocess as P\n"
            "orig = P._preprocess_one\n"
            "def logged(args):\n"
            f"    open({str(log)!r}, 'a').write(args[0].case_id + '\\n'); return orig(args)\n"
            "P._preprocess_one = logged\n"
            "from runner.workspace import Workspace\n"
            f"P.preprocess_dataset(Workspace(Path({str(plan)!r})), workers=1, progress=False)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-2000:]
    written = log.read_text().split()
    assert sorted(written) == sorted(set(written)) and len(written) == 8


def test_a_fold_already_running_refuses_and_status_says_training(phantoms, tmp_path):
    from runner.pipeline import run_fold
    from runner.status import status
    from runner.workspace import Workspace
    plan = tiny_plan(phantoms, tmp_path / "plans" / "t.yaml")
    ws = Workspace(plan)
    p = _holding(ws.fold(1).lock)
    try:
        with pytest.raises(Busy, match=rf"fold 1 .* in use by host \S+ pid {p.pid}"):
            run_fold(ws, 1, progress=False)
        r = subprocess.run([sys.executable, "-m", "runner.cli", "run", str(plan), "--fold", "1"], cwd=ROOT,
                           capture_output=True, text=True)
        assert r.returncode == 2 and f"pid {p.pid}" in r.stderr
        text = status(plan)
        assert "fold 1: training (first epoch)" in text and "fold 0: not started" in text
    finally:
        p.kill()
        p.wait()
    ws.fold(0).dir.mkdir(parents=True)
    ws.fold(0).failed.write_text("ValueError: the batch worker died\n")
    assert "fold 0: failed: ValueError: the batch worker died" in status(plan)


def test_submit_local_runs_preprocess_folds_and_summary_and_resubmit_skips(phantoms, tmp_path):
    from runner.cluster import Resources, submit
    from runner.status import status
    from runner.workspace import Workspace
    plan = tiny_plan(phantoms, tmp_path / "plans" / "t.yaml")
    dry = submit(plan, executor="slurm", resources=Resources(partition="gpu"), dry_run=True)
    assert any("fold1: 1 GPU" in l and "partition gpu" in l and "after preprocess" in l for l in dry)
    assert dry[-1].endswith("after folds 0, 1")
    lines = submit(plan, executor="local", resources=Resources(gpus_per_job=0, cpus_per_job=1, hours=0.5))
    ws = Workspace(plan)
    assert ws.cv_summary_md.exists() and "fold 1" in ws.cv_summary_md.read_text()
    jobs = yaml.safe_load((ws.cluster / "jobs.yaml").read_text())
    assert jobs["executor"] == "local" and set(jobs["folds"]) == {0, 1}
    assert any(l.startswith("fold 0: job ") for l in lines) and any(str(ws.cluster / "logs") in l for l in lines)
    text = status(plan)
    assert text.count("finished (Dice") == 2, text
    again = submit(plan, executor="local", resources=Resources(gpus_per_job=0, cpus_per_job=1, hours=0.5))
    assert "fold 0: finished, skipped" in again and "fold 1: finished, skipped" in again
    assert not any(l.startswith("fold 0: job") for l in again)


def test_fold_job_requeues_as_itself():
    from runner.cluster import FoldJob
    job = FoldJob("/x/plan.yaml", 3, data_parallel=True)
    again = job.checkpoint()
    assert isinstance(again.function, FoldJob)
    assert (again.function.plan_path, again.function.fold, again.function.data_parallel) == ("/x/plan.yaml", 3, True)


def test_a_fold_job_stopped_by_the_scheduler_requeues_and_continues_at_the_next_epoch(phantoms, tmp_path):
    """What SLURM does at a time limit or preemption (USR2 to the job), through submitit's local
    executor: the job checkpoints, is requeued, and the requeued job resumes the fold."""
    import submitit
    from runner.cluster import FoldJob
    from runner.preprocess import preprocess_dataset
    from runner.tables import read_rows
    from runner.workspace import Workspace
    plan = tiny_plan(phantoms, tmp_path / "plans" / "t.yaml", epochs=8, iterations=4)
    ws = Workspace(plan)
    preprocess_dataset(ws, workers=1, progress=False)
    ex = submitit.AutoExecutor(folder=tmp_path / "logs" / "%j", cluster="local")
    ex.update_parameters(timeout_min=20)
    job = ex.submit(FoldJob(str(plan), 0))
    t = time.perf_counter()
    while not ws.fold(0).is_trained():
        assert time.perf_counter() - t < 300 and job.state == "RUNNING", job.stderr()
        time.sleep(0.2)
    # SLURM signals the job's processes (USR2, --signal) before its time limit or on preemption; the
    # training process names itself in the fold's lock
    import os
    import re
    import signal
    os.kill(int(re.search(r"pid (\d+)", holder(ws.fold(0).lock)).group(1)), signal.SIGUSR2)
    dice = job.result()
    log = (job.stderr() or "") + (job.stdout() or "")
    assert "Requeued" in log, log[-3000:]
    assert [int(r["epoch"]) for r in read_rows(ws.fold(0).history)] == list(range(8))  # every epoch once, in order
    assert ws.fold(0).is_finished() and set(dice) >= {"left_lung", "right_lung"}
