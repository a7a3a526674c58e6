"""Beyond one process (issue 14): locks on a shared work folder, `segplan status` from the work
folder alone, and `segplan submit` through submitit's local executor (the SLURM executor is tested
on a real one-node cluster in tests/cluster/test_slurm.py)."""
from __future__ import annotations

import builtins
import errno
import fcntl
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from segplan.runner.locks import Busy, exclusive, hold, holder, is_held
from tests.tiny import tiny_plan

ROOT = Path(__file__).resolve().parents[1]
OFD = ("F_OFD_SETLK", "F_OFD_SETLKW", "F_OFD_GETLK")
# a platform without open-file-description locks (macOS): the constants hidden, in a child process too
NO_OFD = f"import fcntl\nfor n in {OFD!r}:\n    delattr(fcntl, n)\n"


@pytest.fixture(params=["ofd", "flock"])
def lock_kind(request, monkeypatch) -> str:
    """The lock tests run twice: with Linux' open-file-description locks, and as on a platform that
    has none (issue 39: macOS), where locks.py falls back to flock. Returns the code that a child
    process runs first to be on the same platform."""
    if request.param == "ofd":
        return ""
    for name in OFD:
        monkeypatch.delattr(fcntl, name)
    return NO_OFD


def _holding(path: Path, seconds: float = 60, first: str = "") -> subprocess.Popen:
    """Another process that takes the lock at ``path`` and keeps it (until killed); it runs
    ``first`` before (a lock_kind's platform)."""
    code = (f"{first}import time; from segplan.runner.locks import hold\n"
            f"with hold({str(path)!r}, 'test'):\n    print('held', flush=True); time.sleep({seconds})")
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_held_lock_refuses_naming_its_holder_and_a_dead_holder_is_stale(tmp_path, capsys, lock_kind):
    lock = tmp_path / "x.lock"
    p = _holding(lock, first=lock_kind)
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


def test_exclusive_waits_for_the_holder(tmp_path, lock_kind):
    lock = tmp_path / "y.lock"
    p = _holding(lock, seconds=1.5, first=lock_kind)
    t = time.perf_counter()
    with exclusive(lock, "cache"):
        waited = time.perf_counter() - t
    p.wait()
    assert waited > 0.5


def test_without_ofd_locks_the_fallback_is_flock_and_a_second_holder_is_refused(tmp_path, lock_kind):
    """The same lock file held in this process refuses a second hold (a lock of the open file, not
    of the process, in both kinds), and on a platform without F_OFD_* the lock really is a flock."""
    lock = tmp_path / "z.lock"
    with hold(lock, "fold 0"):
        assert is_held(lock)
        with pytest.raises(Busy):
            with hold(lock, "fold 0"):
                pass
        if lock_kind:
            with open(lock) as f, pytest.raises(BlockingIOError):
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert not is_held(lock)


def _read_only(monkeypatch, root: Path) -> None:
    """Every write under ``root`` fails with PermissionError, as in a colleague's folder or a mounted
    archive. Simulated in this process because tests run as root (CI) and root ignores permission bits."""
    root = os.path.realpath(root) + os.sep

    def refuse(path) -> None:
        if not isinstance(path, int) and (os.path.realpath(os.fspath(path)) + os.sep).startswith(root):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))

    def guarded(real, writes=lambda *a, **k: True):
        def call(path, *a, **k):
            if writes(*a, **k):
                refuse(path)
            return real(path, *a, **k)
        return call

    def open_writes(mode="r", *a, **k):
        return any(c in mode for c in "wax+")

    def os_open_writes(flags, *a, **k):
        return bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND))

    monkeypatch.setattr(builtins, "open", guarded(builtins.open, open_writes))
    monkeypatch.setattr(io, "open", guarded(io.open, open_writes))
    monkeypatch.setattr(os, "open", guarded(os.open, os_open_writes))
    for name in ("mkdir", "remove", "unlink", "rmdir", "rename", "replace", "truncate", "utime", "chmod"):
        monkeypatch.setattr(os, name, guarded(getattr(os, name)))


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def test_status_and_dry_run_read_a_read_only_work_folder_without_writing(phantoms, tmp_path, monkeypatch, capsys):
    """A colleague's results: fold 0 begun by a process that died holding its lock, fold 1 being
    trained by a live process. Inspecting them needs no write access and writes nothing."""
    from segplan.runner.cli import main
    from segplan.runner.workspace import Workspace
    plan = tiny_plan(phantoms, tmp_path / "plans" / "t.yaml")
    ws = Workspace(plan)
    ws.freeze(0)
    dead = _holding(ws.fold(0).lock)
    dead.kill()
    dead.wait()
    live = _holding(ws.fold(1).lock)
    try:
        before = _snapshot(tmp_path / "plans")
        _read_only(monkeypatch, tmp_path)
        assert main(["status", str(plan)]) == 0
        out = capsys.readouterr().out
        assert "fold 0: not started" in out and "fold 1: training (first epoch) [host" in out
        assert f"pid {live.pid}" in out and f"pid {dead.pid}" not in out
        assert main(["submit", str(plan), "--dry-run"]) == 0
        out = capsys.readouterr().out
        assert "fold 1: being trained now, skipped" in out and "fold0: " in out and "fold1: " not in out
        monkeypatch.undo()
        assert _snapshot(tmp_path / "plans") == before
    finally:
        live.kill()
        live.wait()


def _try_hold(path: Path) -> str:
    """What another process gets when it tries to take the lock now: 'took it' or 'busy: ...'."""
    code = (f"from segplan.runner.locks import Busy, hold\ntry:\n    with hold({str(path)!r}, 'fold 0'):\n"
            f"        print('took it')\nexcept Busy as e:\n    print('busy:', e)")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_inspecting_a_lock_never_keeps_another_process_from_taking_it(tmp_path, monkeypatch):
    """`segplan status` while a fold job starts: at every lock call the inspection makes, another
    process can still take the lock (an inspection that takes it, even for a moment, refuses the job
    as busy, naming whoever held it last)."""
    lock = tmp_path / ".fold_0.lock"
    p = _holding(lock)
    p.kill()
    p.wait()  # a begun fold whose last holder died: its line is still in the file
    seen = []

    def then_start_a_job(real):
        def call(*a, **k):
            out = real(*a, **k)
            seen.append(_try_hold(lock))
            return out
        return call

    for name in ("flock", "lockf", "fcntl"):
        monkeypatch.setattr(fcntl, name, then_start_a_job(getattr(fcntl, name)))
    assert not is_held(lock)
    assert seen and all(s.splitlines()[-1] == "took it" for s in seen), seen


def test_two_preprocessing_processes_write_each_case_once(phantoms, tmp_path):
    plan = tiny_plan(phantoms, tmp_path / "plans" / "t.yaml")
    log = tmp_path / "written.txt"
    code = ("import sys; from pathlib import Path; import segplan.runner.preprocessing.preprocess as P\n"
            "orig = P._preprocess_one\n"
            "def logged(args):\n"
            f"    open({str(log)!r}, 'a').write(args[0].case_id + '\\n'); return orig(args)\n"
            "P._preprocess_one = logged\n"
            "from segplan.runner.workspace import Workspace\n"
            f"P.preprocess_dataset(Workspace(Path({str(plan)!r})), workers=1, progress=False)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-2000:]
    written = log.read_text().split()
    assert sorted(written) == sorted(set(written)) and len(written) == 8


def test_a_fold_already_running_refuses_and_status_says_training(phantoms, tmp_path):
    from segplan.runner.pipeline import run_fold
    from segplan.runner.status import status
    from segplan.runner.workspace import Workspace
    plan = tiny_plan(phantoms, tmp_path / "plans" / "t.yaml")
    ws = Workspace(plan)
    p = _holding(ws.fold(1).lock)
    try:
        with pytest.raises(Busy, match=rf"fold 1 .* in use by host \S+ pid {p.pid}"):
            run_fold(ws, 1, progress=False)
        r = subprocess.run([sys.executable, "-m", "segplan.runner.cli", "run", str(plan), "--fold", "1"], cwd=ROOT,
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
    from segplan.runner.cluster import Resources, submit
    from segplan.runner.status import status
    from segplan.runner.workspace import Workspace
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
    from segplan.runner.cluster import FoldJob
    job = FoldJob("/x/plan.yaml", 3, data_parallel=True)
    again = job.checkpoint()
    assert isinstance(again.function, FoldJob)
    assert (again.function.plan_path, again.function.fold, again.function.data_parallel) == ("/x/plan.yaml", 3, True)


def test_a_fold_job_stopped_by_the_scheduler_requeues_and_continues_at_the_next_epoch(phantoms, tmp_path):
    """What SLURM does at a time limit or preemption (USR2 to the job), through submitit's local
    executor: the job checkpoints, is requeued, and the requeued job resumes the fold."""
    import submitit
    from segplan.runner.cluster import FoldJob
    from segplan.runner.preprocessing.preprocess import preprocess_dataset
    from segplan.runner.evaluation.tables import read_rows
    from segplan.runner.workspace import Workspace
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
