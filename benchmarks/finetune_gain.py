"""Does a bundle help? Hippocampus fold 0 after M minutes of CPU training from a bundle's weights
against M minutes from scratch with the same network (issue 13).

    python benchmarks/finetune_gain.py [--source-minutes 3] [--minutes 2] [--work /tmp/finetune_gain]

1. Source model: a CPU plan trained for --source-minutes on half of fold 0's training cases (the
   other half and the validation cases unseen), exported as a bundle.
2. Fine-tune: `plan --from` the bundle on the full dataset, fold 0 for --minutes.
3. Scratch: the same plan without initial weights, fold 0 for --minutes.
Prints the mean validation Dice (52 cases, final weights) of 2 and 3.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import HIPPOCAMPUS as DATA  # noqa: E402


def dice(ws, k: int = 0) -> dict:
    import yaml
    s = yaml.safe_load(ws.fold(k).validation_summary.read_text())
    return {c: round(v["dice"]["mean"], 4) for c, v in s["classes"].items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source-minutes", type=float, default=3.0)
    ap.add_argument("--minutes", type=float, default=2.0)
    ap.add_argument("--work", default="/tmp/finetune_gain")
    a = ap.parse_args()
    from segplan.planner.plan_file import load_plan, save_plan
    from segplan.planner.planning import plan_dataset
    from segplan.runner.inference.bundle import export
    from segplan.runner.pipeline import run_fold
    from segplan.runner.workspace import Workspace
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    splits = json.loads((DATA / "splits_final.json").read_text())
    half = splits[0]["train"][: len(splits[0]["train"]) // 2]

    def cpu_plan(name: str, minutes: float, **kw) -> Path:
        p = plan_dataset(DATA, work / f"{name}.yaml", device="cpu", time_budget=minutes, force=True,
                         progress=False, **kw)
        return p
    src = cpu_plan("source", a.source_minutes)
    plan = load_plan(src)
    # two folds that partition the cases: fold 0 trains on half of nnU-Net's fold-0 training cases only
    every = sorted({c for s in splits for part in s.values() for c in part})
    others = [c for c in every if c not in half]
    split = [{"train": half, "val": others}, {"train": others, "val": half}]
    (work / "half_split.json").write_text(json.dumps(split))
    save_plan(plan.replace(dataset=dataclasses.replace(plan.dataset, splits_file="half_split.json"),
                           cross_validation=dataclasses.replace(plan.cross_validation, folds=2)), src)
    ws = Workspace(src)
    run_fold(ws, 0, restart=True, progress=False)
    bundle = export(src, work / "source.zip", folds=[0])
    print(f"source ({len(half)} training cases, {a.source_minutes:g} min): {dice(ws)} on the rest; bundle {bundle}")
    ft = cpu_plan("finetune", a.minutes, from_bundle=bundle)
    ws_ft = Workspace(ft)
    run_fold(ws_ft, 0, restart=True, progress=False)
    scratch = work / "scratch.yaml"
    p = load_plan(ft)
    save_plan(p.replace(training=dataclasses.replace(p.training, initial_weights=None),
                        dataset=dataclasses.replace(p.dataset, work_dir="work/scratch")), scratch)
    ws_s = Workspace(scratch)
    run_fold(ws_s, 0, restart=True, progress=False)
    print(json.dumps({"minutes": a.minutes, "network": p.network.filters, "fine_tuned": dice(ws_ft),
                      "from_scratch": dice(ws_s)}, indent=1))


if __name__ == "__main__":
    main()
