"""Helpers shared by the benchmark scripts: wall time and peak memory of a step."""
from __future__ import annotations

import resource
import time
from contextlib import contextmanager
from pathlib import Path

# before any benchmark imports Keras: importing segplan turns TensorFlow's oneDNN on where TensorFlow
# leaves it off (segplan.runner.backend.prefer_onednn), as every segplan command does; a script that
# imported keras first trained 4-6x slower than `segplan run` on a CPU without AVX-512
import segplan  # noqa: F401,E402

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


def _tree_memory_bytes(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of a process and all its descendants (Linux /proc). PSS shares each page among
    the processes that map it, so forked workers (which share their parent's pages) are not
    counted twice; RSS sums them as if they were not shared."""
    rss = pss = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return rss, pss


def run_measured(cmd: list[str], env: dict | None = None, interval: float = 0.1,
                 output=None) -> tuple[float, float, float]:
    """Run a command; (wall seconds, peak GiB of its whole process tree by PSS, and by RSS),
    sampled every ``interval`` seconds. ``output``: a file its stdout and stderr go to."""
    import subprocess
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=output, stderr=subprocess.STDOUT if output else None)
    peak_rss = peak_pss = 0
    while proc.poll() is None:
        rss, pss = _tree_memory_bytes(proc.pid)
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(interval)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}")
    return time.perf_counter() - t, peak_pss / 1024 ** 3, peak_rss / 1024 ** 3
