"""`segplan demo`: the whole workflow on a dozen small phantoms, on a CPU, in a few minutes."""
from __future__ import annotations

import time
from pathlib import Path

DEMO_CASES = 12
DEMO_SCALE = 0.25
# 3 minutes of training keep the whole demo near 4 on 2 cores; 4 minutes gave the same Dice within
# the spread of runs (docs/benchmarks.md, the demo)
DEMO_MINUTES = 3.0


def run_demo(workdir: Path, minutes: float = DEMO_MINUTES, cases: int = DEMO_CASES, scale: float = DEMO_SCALE,
             progress: bool = True) -> int:
    """phantoms -> plan (CPU, time budget) -> fold 0 -> predict + evaluate its validation cases -> report."""
    from segplan.datasets.phantoms import make_phantoms
    from segplan.planner.planning import plan_dataset
    from segplan.runner.pipeline import run_fold
    from segplan.runner.evaluation.report import summarize
    from segplan.runner.workspace import Workspace
    t0 = time.perf_counter()
    marks = [t0]

    def took() -> str:
        """Seconds the step just finished took (where the demo's minutes go)."""
        marks.append(time.perf_counter())
        return f"      ({marks[-1] - marks[-2]:.0f} s)"
    workdir = Path(workdir)
    data = workdir / "phantoms"
    if not (data / "dataset.json").exists():
        print(f"[1/4] making {cases} chest-CT phantoms (scale {scale}) in {data}")
        make_phantoms(data, cases=cases, seed=0, scale=scale, workers=2, progress=progress)
        print(took())
    plan_path = workdir / "plans" / "phantoms.yaml"
    if not plan_path.exists():
        print(f"[2/4] planning for this CPU with a {minutes:g}-minute training budget")
        plan_dataset(data, plan_path, device="cpu", time_budget=minutes, workers=2, progress=progress)
        print(took())
    print("[3/4] training fold 0 (then predicting and evaluating its validation cases)")
    ws = Workspace(plan_path)
    fold = ws.fold(0)
    run_fold(ws, 0, resume=fold.is_trained(), progress=progress)
    print(took())
    print("[4/4] report")
    print(summarize(ws))
    print(took())
    print(f"\ndone in {(time.perf_counter() - t0) / 60:.1f} min. Files:\n"
          f"  plan:        {plan_path}  (edit it, then `segplan run {plan_path} --fold 0 --restart`)\n"
          f"  checkpoints: {fold.dir}  ({fold.pointer.name}, {fold.history.name}, {fold.progress.name})\n"
          f"  predictions: {fold.validation}  ({fold.validation_metrics.name}, {fold.validation_summary.name})\n"
          f"  report:      {ws.cv_report_html} (open it in a browser), {ws.cv_summary_md.name}, "
          f"{ws.cv_boxplots.name}, {ws.overlays.name}/")
    return 0
