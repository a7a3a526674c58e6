"""TensorFlow's oneDNN CPU kernels wherever TensorFlow leaves them off (issue 40): segplan turns them
on before TensorFlow is imported, a user's own TF_ENABLE_ONEDNN_OPTS wins, and a TensorFlow
imported before segplan is left as it started."""
from __future__ import annotations

import os
import subprocess
import sys

from segplan.runner.backend import ONEDNN, prefer_onednn


def test_on_unless_the_user_chose_or_tensorflow_started_first():
    env = {}
    assert prefer_onednn(env, {}, machine="x86_64").startswith("turned on") and env == {ONEDNN: "1"}
    for users in ("0", "1"):
        env = {ONEDNN: users}
        assert "user" in prefer_onednn(env, {}, machine="x86_64") and env == {ONEDNN: users}
    env = {}
    assert "imported before" in prefer_onednn(env, {"tensorflow": object()}, machine="x86_64") and env == {}
    assert "x86-64" in prefer_onednn(env, {}, machine="aarch64") and env == {}   # not measured there


def _child(code: str, **extra) -> str:
    env = {k: v for k, v in os.environ.items() if k != ONEDNN} | extra
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_importing_segplan_sets_it_for_the_process_and_what_it_starts():
    """Every command, worker, probe and SLURM job imports segplan (or inherits the environment of a
    process that did) before TensorFlow: what they run with is what the parent chose."""
    grandchild = f"import os; print(os.environ.get({ONEDNN!r}))"
    code = ("import os, subprocess, sys, segplan\n"
            f"print(os.environ.get({ONEDNN!r}), subprocess.run([sys.executable, '-c', {grandchild!r}], "
            "capture_output=True, text=True).stdout.strip())")
    assert _child(code) == "1 1"
    assert _child(code, **{ONEDNN: "0"}) == "0 0"
    assert _child(f"import os, tensorflow, segplan; print(os.environ.get({ONEDNN!r}))") == "None"
