"""`segplan submit --executor slurm` on a real one-node SLURM (issue 14).

.ci/run starts the cluster (tests/cluster/slurm_up.sh, as root) before the suite and stops it after.
Where no cluster answers, the test skips with the reason (a user's laptop); under CI it fails
instead: CI must really run it."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.tiny import tiny_plan

pytestmark = pytest.mark.slurm
ROOT = Path(__file__).resolve().parents[2]
DEADLINE_S = 900


def _why_no_cluster() -> str | None:
    if not shutil.which("sinfo"):
        return "no SLURM here (sinfo not found); as root, tests/cluster/slurm_up.sh starts a one-node cluster"
    r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    if r.returncode != 0 or not re.search(r"\b(idle|mixed|allocated)\b", r.stdout):
        return f"no SLURM node is up (sinfo: {(r.stderr or r.stdout).strip() or 'no nodes'}); run tests/cluster/slurm_up.sh"
    return None


@pytest.fixture(scope="module")
def cluster():
    why = _why_no_cluster()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the SLURM test, but {why}")
        pytest.skip(why)


def _in_queue(ids: list[str]) -> list[str]:
    r = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(ids)], capture_output=True, text=True)
    return r.stdout.split()


def test_submit_two_folds_and_summary_to_slurm(cluster, phantoms, tmp_path):
    plan = tiny_plan(phantoms, tmp_path / "plans" / "s.yaml", folds=2)
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "segplan.runner.cli", "submit", str(plan), "--executor", "slurm",
                        "--gpus-per-job", "0", "--cpus-per-job", "1", "--mem", "3", "--time", "0.5"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    ids = dict(re.findall(r"^(preprocess|fold \d|summarize): job (\d+)$", r.stdout, re.M))
    assert set(ids) == {"preprocess", "fold 0", "fold 1", "summarize"}, r.stdout
    from segplan.runner.status import status
    from segplan.runner.workspace import Workspace
    ws = Workspace(plan)
    early = status(plan)  # while the jobs are queued or running: the scheduler's view for folds not yet training
    assert "fold 0:" in early and "fold 1:" in early
    while _in_queue(list(ids.values())):
        assert time.perf_counter() - t < DEADLINE_S, f"jobs still queued after {DEADLINE_S} s:\n{status(plan)}"
        time.sleep(3)
    wall = time.perf_counter() - t
    logs = sorted((ws.cluster / "logs").rglob("*_log.err"))
    assert ws.cv_summary_md.exists(), "summarize did not run:\n" + "\n".join(
        f"{p}: {p.read_text()[-500:]}" for p in logs)
    text = status(plan)
    assert text.count("finished (Dice") == 2, text
    # the summarize job ran after both folds (afterok dependencies), the folds after preprocessing
    cv = ws.cv_summary_md.stat().st_mtime
    assert all(ws.fold(k).finished.stat().st_mtime < cv for k in (0, 1))
    jobs = yaml.safe_load((ws.cluster / "jobs.yaml").read_text())
    assert jobs["executor"] == "slurm" and {str(v) for v in jobs["folds"].values()} == {ids["fold 0"], ids["fold 1"]}
    print(f"SLURM: preprocess + 2 folds + summarize in {wall:.0f} s")
    again = subprocess.run([sys.executable, "-m", "segplan.runner.cli", "submit", str(plan), "--executor", "slurm",
                            "--gpus-per-job", "0", "--dry-run"], cwd=ROOT, capture_output=True, text=True)
    assert "fold 0: finished, skipped" in again.stdout and "fold1" not in again.stdout
