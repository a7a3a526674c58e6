"""Helpers shared by the benchmark scripts: wall time and peak memory of a step."""
from __future__ import annotations

import resource
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HIPPOCAMPUS = ROOT.parent / "shared" / "data" / "Dataset004_Hippocampus"


def peak_rss_gb(children: bool = True) -> float:
    """Peak resident memory of this process (and, if asked, of its largest finished child), in GiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss if children else 0
    return max(own, kids) / 1024 ** 2


@contextmanager
def timed(label: str, out: dict):
    t = time.perf_counter()
    yield
    out[label] = time.perf_counter() - t
    print(f"{label}: {out[label]:.1f} s")
