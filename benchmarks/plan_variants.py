"""One lever at a time (issue 23): fold 0 of nnU-Net's Hippocampus split under one CPU plan and
variants of it that differ in the plan keys you name, each trained for the same budget.

    python benchmarks/plan_variants.py --minutes 5 --variant base \
        --variant lr3e-3:training.learning_rate=0.003 --variant bf16:training.mixed_precision=true
    python benchmarks/plan_variants.py --minutes 0.3 --cases 10 --no-probe --max-epochs 2 \
        --variant base --variant noaug:training.augmentation.elastic_p=0    # a quick check

Plans ../shared/data/Dataset004_Hippocampus once with `--device cpu --time-budget MINUTES` (the
width probe included), then per `--variant NAME[:KEY=VALUE,...]` writes the plan with those keys
set (dotted paths into the plan YAML; values read as YAML; `base` sets nothing), validates it as
`segplan check` does, trains fold 0 of splits_final.json and predicts and evaluates the fold's
validation cases with the final weights. Prints per variant the mean Dice per class, iterations,
seconds per iteration and the share of the loop spent outside training steps, then one JSON line
with everything. Run it on a quiet machine: the budget is wall time, so other processes' load
changes how far each variant gets.
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import HIPPOCAMPUS as DATA  # noqa: E402
from benchmarks.deep_supervision import fold_figures, plan_once  # noqa: E402


def parse_variant(text: str) -> tuple[str, dict]:
    """``NAME[:a.b=1,c.d=true,e.f=[1,2]]`` -> (NAME, {"a.b": 1, "c.d": True, "e.f": [1, 2]}); values are
    YAML (a comma starts the next key only where a ``key=`` follows it, so lists keep theirs)."""
    name, _, sets = text.partition(":")
    if not name:
        raise argparse.ArgumentTypeError(f"a variant needs a name: {text!r}")
    pairs = {}
    for item in filter(None, re.split(r",(?=[A-Za-z_][\w.]*=)", sets)):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise argparse.ArgumentTypeError(f"{item!r} in variant {name!r} is not KEY=VALUE")
        pairs[key.strip()] = yaml.safe_load(value)
    return name, pairs


def apply_sets(raw: dict, sets: dict) -> dict:
    """The plan's YAML mapping with each dotted key set (the key must exist: a typo is an error)."""
    for dotted, value in sets.items():
        node, *path = raw, *dotted.split(".")
        for part in path[:-1]:
            if not isinstance(node, dict) or part not in node:
                raise KeyError(f"no plan key {dotted!r} ({part!r} missing)")
            node = node[part]
        if not isinstance(node, dict) or path[-1] not in node:
            raise KeyError(f"no plan key {dotted!r}")
        node[path[-1]] = value
    return raw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=5.0, help="training budget of each variant")
    ap.add_argument("--variant", type=parse_variant, action="append", required=True,
                    help="NAME[:KEY=VALUE,...]; repeat for each variant")
    ap.add_argument("--repredict", type=parse_variant, action="append", default=[],
                    help="NAME:inference.KEY=VALUE,...: after each variant, predict its validation cases again "
                         "with these inference settings (the same weights) and score them too")
    ap.add_argument("--work", default="/tmp/hippo_variants")
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--max-epochs", type=int, default=None, help="a quick check: stop each variant after this many")
    ap.add_argument("--cases", type=int, default=None, help="a quick check: only this many cases of the dataset")
    ap.add_argument("--no-probe", action="store_true", help="a quick check: skip the planner's width probe")
    a = ap.parse_args()
    for again, inference in a.repredict:
        if not inference or any(not k.startswith("inference.") for k in inference):
            ap.error(f"--repredict {again}: set inference.* keys only (the weights stay those trained)")
    import keras
    from segplan.planner.plan_file import load_plan, save_plan
    from segplan.planner.schema import to_plain
    from segplan.runner.pipeline import predict_validation, run_fold
    from segplan.runner.workspace import Workspace
    work, base_path = Path(a.work), plan_once(a)
    base = load_plan(base_path)
    results = {}
    for name, sets in a.variant:
        raw = to_plain(base)
        if a.max_epochs is not None:
            sets = {"training.schedule.max_epochs": a.max_epochs, **sets}
        raw = apply_sets(raw, sets | {"name": f"{base.name}_{name}",
                                      "dataset.work_dir": f"{base.dataset.work_dir}_{name}"})
        path = work / f"{raw['name']}.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        save_plan(load_plan(path), path)  # validated as `segplan check` does, written in the commented form
        ws = Workspace(path)
        keras.backend.clear_session()
        t = time.perf_counter()
        run_fold(ws, a.fold, restart=True, progress=False)
        done = json.loads(ws.fold(a.fold).finished.read_text())
        results[name] = (fold_figures(ws, a.fold, ws.plan) | {"sets": sets, "run_seconds": round(time.perf_counter() - t, 1)}
                         | {k: done.get(k) for k in ("loop_seconds", "outside_steps_share", "validation_seconds",
                                                      "bookkeeping_seconds", "batch_wait_seconds")})
        for again, inference in a.repredict:
            path.write_text(yaml.safe_dump(apply_sets(copy.deepcopy(raw), inference), sort_keys=False))
            t = time.perf_counter()
            predict_validation(Workspace(path), a.fold, progress=False)
            summary = yaml.safe_load(ws.fold(a.fold).validation_summary.read_text())
            results[name][again] = {"sets": inference, "seconds": round(time.perf_counter() - t, 1),
                                    "mean_dice": {c: round(v["dice"]["mean"], 4) for c, v in summary["classes"].items()}}
        r = results[name]
        print(f"{name}: {r['epochs']} epochs, {r['iterations']} iterations at {r['seconds_per_iteration']} s/it, "
              f"outside steps {r['outside_steps_share']}, Dice {r['mean_dice']} on {r['validation_cases']} cases",
              flush=True)
        for again, _ in a.repredict:
            print(f"  {name} + {again}: Dice {r[again]['mean_dice']} ({r[again]['seconds']} s to predict)", flush=True)
    print(json.dumps({"minutes": a.minutes, "fold": a.fold, "filters": base.network.filters,
                      "patch": base.training.patch_size, "batch": base.training.batch_size, "cases": a.cases,
                      "variants": results}))


if __name__ == "__main__":
    main()
