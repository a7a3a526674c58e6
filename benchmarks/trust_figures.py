"""The three figures of issue 42 from a summarized cross-validation (docs/benchmarks.md): ECE before
and after calibration, the quality score's Spearman correlation with the cases' Dice, and how many
of the worst 10% of cases the flag catches at what rate of flagged other cases.

    python benchmarks/hippocampus_cv.py --minutes 3 --work /tmp/hippo_cv   # trains, validates, summarizes
    python benchmarks/trust_figures.py /tmp/hippo_cv/hippocampus_cv.yaml

Every figure is cross-fitted by `segplan summarize` (fitted on the other folds, measured on each
fold's own cases); this script only reads WORK/calibration.yaml and WORK/qc.yaml.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("plan", help="a plan whose folds are validated and summarized")
    a = ap.parse_args()
    from segplan.runner.workspace import Workspace
    ws = Workspace(Path(a.plan))
    c = yaml.safe_load(ws.calibration.read_text())
    q = yaml.safe_load(ws.qc_model.read_text())
    f = q["figures"]
    print(f"calibration: {c['scope']} temperature {c['temperature']}; ECE {c['ece_before']:.4f} -> {c['ece_after']:.4f} "
          f"(voxels near the structures), {c['ece_all_voxels_before']:.4f} -> {c['ece_all_voxels_after']:.4f} "
          "(all annotated voxels); per fold:")
    for row in c["per_fold"]:
        print(f"  fold {row['fold']}: T {row['temperature']}, ECE {row['ece_before']:.4f} -> {row['ece_after']:.4f}")
    print(f"quality score '{q['chosen']}': Spearman with Dice " +
          ", ".join(f"{k} {v}" for k, v in f["spearman_score_vs_dice"].items()) + f" ({f['cases']} cases)")
    w, o = f["worst_10_percent"], f["other_cases_flagged"]
    print(f"flag: caught {w['caught']} of the worst {w['cases']} cases (Dice <= {w['dice_at_most']}), flagged "
          f"{o['flagged']} of the other {o['cases']} ({o['rate']:.1%})")
    fam = f["family_cases_called_out_of_family"]
    print(f"out of family: {fam['flagged']} of {fam['cases']} training cases outside the other folds' fences")


if __name__ == "__main__":
    main()
