"""Logs a person can read (issue 12): `segplan run > log` holds one line per epoch and per case, no
carriage-returned progress bars, and no TensorFlow start-up notices unless --verbose."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny import tiny_plan

ROOT = Path(__file__).resolve().parents[1]
NOISE = ("oneDNN", "cuInit", "cuda drivers", "absl::InitializeLog", "cpu_feature_guard")


def _segplan(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "segplan.runner.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:]
    return r.stdout


@pytest.mark.e2e
def test_a_log_file_gets_lines_not_bars_and_no_tensorflow_noise(phantoms, tmp_path):
    plan = tiny_plan(phantoms, tmp_path / "p.yaml", epochs=2, iterations=2)
    log = _segplan("run", str(plan), "--fold", "0")
    assert "\r" not in log, "progress bars in a log file"
    lines = log.splitlines()
    assert sum(line.startswith("fold 0 epoch ") for line in lines) == 2
    assert sum(line.startswith("predicted ") for line in lines) == 4          # the fold's validation cases
    assert not [line for line in lines if any(n in line for n in NOISE)], log[:2000]
    one = tmp_path / "in"  # --verbose on a cheaper command that starts TensorFlow too: predict one image
    one.mkdir()
    image = sorted((phantoms / "imagesTr").glob("*"))[0]
    shutil.copy(image, one / image.name)
    verbose = _segplan("--verbose", "predict", str(plan), "-i", str(one), "-o", str(tmp_path / "out"), "--folds", "0")
    assert any(n in verbose for n in NOISE), "--verbose should keep TensorFlow's messages"
    assert len(list((tmp_path / "out").glob("*.nii.gz"))) == 1
