"""`segplan summarize`'s part in trust: the calibration and the quality check fitted on the plan's
out-of-fold predictions (WORK/calibration.yaml with calibration.png, WORK/qc.yaml), cross-fitted so
that every figure is on cases the fit did not see. Needs at least two validated folds."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from segplan.planner.dataset import read_label  # noqa: E402
from segplan.planner.fileio import save_figure, write_yaml  # noqa: E402
from segplan.planner.labels import label_model  # noqa: E402
from segplan.runner.evaluation.html_report import rank_cases  # noqa: E402
from segplan.runner.preprocessing.preprocess import labels_to_classes  # noqa: E402
from segplan.runner.evaluation.oof import load_probabilities, missing_probabilities  # noqa: E402
from segplan.runner.evaluation.tables import read_rows  # noqa: E402
from segplan.runner.trust import calibration as cal, quality  # noqa: E402
from segplan.runner.trust.checks import save_calibration  # noqa: E402
from segplan.runner.workspace import Workspace  # noqa: E402

SEED = 0


def lacking(ws: Workspace, k: int) -> list[str]:
    """Fold k's validation cases without quality features (validated before segplan wrote them, or
    interrupted between a case's files): what `segplan run --fold k` validates again. Missing
    probabilities are oof.missing_probabilities'."""
    feats = {r["case"]: r for r in read_rows(ws.fold(k).validation_qc_features)}
    return [c for c in ws.splits()[k]["val"] if c not in feats or any(f not in feats[c] for f in quality.FEATURES)]


def validated_folds(ws: Workspace) -> tuple[list[int], list[str]]:
    """The folds whose validation cases have metrics, probabilities and quality features, and a line
    for each fold that lacks them (and what to run)."""
    ready, notes = [], []
    for fold in ws.folds():
        if not fold.validation_metrics.exists():
            continue
        without = lacking(ws, fold.index) + missing_probabilities(ws, fold.index)
        if without:
            notes.append(f"fold {fold.index}: {len(without)} validation case(s) without quality features or "
                         f"probabilities (validated before segplan wrote them; e.g. {without[0]}): run "
                         f"`segplan run {ws.plan_path} --fold {fold.index}` to validate it again")
        else:
            ready.append(fold.index)
    return ready, notes


def fit_trust(ws: Workspace, progress=None) -> list[str]:
    """Fit and write the calibration and the quality model on the validated folds; returns lines
    for the summary (figures, flagged cases, or why nothing was fitted)."""
    folds, notes = validated_folds(ws)
    if len(folds) < 2:
        stale = [p for p in (ws.calibration, ws.calibration_plot, ws.qc_model) if p.exists()]
        for p in stale:   # fitted on folds that are no longer all there: predictions must not use them
            p.unlink()
        if stale:
            notes.append("removed the earlier " + ", ".join(p.name for p in stale) + " (fitted on folds no longer "
                         "validated as they were)")
        return notes + [f"calibration and quality check: need two or more validated folds, have {len(folds)} "
                        "(they are cross-fitted: fitted on some folds, measured on another)"]
    lm = label_model(ws.plan)
    labels = {c.case_id: c.label_file for c in ws.dataset.cases}
    rng = np.random.default_rng(SEED)
    samples: dict[int, list] = {}
    rows, dice, fold_of = [], [], []
    for k in folds:
        fold = ws.fold(k)
        ranked = rank_cases([dict(r, fold=k) for r in read_rows(fold.validation_metrics)], list(lm.structures))
        case_dice = {c["case"]: c["mean_dice"] for c in ranked if not math.isnan(c["mean_dice"])}
        feats = {r["case"]: r for r in read_rows(fold.validation_qc_features)}
        for cid in ws.splits()[k]["val"]:
            classes = labels_to_classes(read_label(labels[cid])[0], ws.plan)
            samples.setdefault(k, []).append(cal.case_samples(load_probabilities(ws, k, cid), classes, lm, rng))
            if cid in case_dice:
                rows.append(dict(feats[cid]))
                dice.append(case_dice[cid])
                fold_of.append(k)
            if progress:
                progress()
    c = cal.cross_fit(samples, lm)
    n_cases = sum(len(v) for v in samples.values())
    save_calibration(ws.calibration, c, lm, n_cases, folds)
    reliability_diagram(c, ws.calibration_plot)
    dice_a, fold_a = np.array(dice), np.array(fold_of)
    q = quality.cross_fit(rows, dice_a, fold_a)
    family_out = quality.family_cross_check([{k: v for k, v in r.items() if k.startswith("ch")} for r in rows],
                                            fold_a)
    flagged = [{"case": r["case"], "fold": int(f), "dice": round(float(d), 4), "score": round(float(s), 4)}
               for r, f, d, s, x in zip(rows, fold_a, dice_a, q["score"], q["flagged"]) if x]
    bad = q["worst"]
    caught = int((q["flagged"] & bad).sum())
    good_flagged = int((q["flagged"] & ~bad).sum())
    figures = {
        "cases": len(rows),
        "spearman_score_vs_dice": {n: (None if math.isnan(v) else round(v, 4)) for n, v in q["spearman"].items()},
        "worst_10_percent": {"cases": int(bad.sum()), "caught": caught,
                             "dice_at_most": round(float(dice_a[bad].max()), 4)},
        "other_cases_flagged": {"cases": int((~bad).sum()), "flagged": good_flagged,
                                "rate": round(good_flagged / max(int((~bad).sum()), 1), 4)},
        "family_cases_called_out_of_family": {"cases": len(rows), "flagged": int(family_out.sum())},
    }
    write_yaml(ws.qc_model, {
        "chosen": q["chosen"], "model": q["model"], "figures": figures,
        "how": ("each candidate is a least-squares line from features to the case's mean Dice over the structures, "
                "fitted on the other folds and scored on each fold's own cases (cross-fitted); the best Spearman "
                "correlation with Dice wins and is refitted on every fold; a case is flagged when its expected Dice "
                "is below the threshold that best separates (Youden's J, flagging at most 20% of the cases) the worst "
                "10% of the cases by Dice, chosen "
                "on the other folds' cross-fitted scores for the figures and on all of them for new predictions; "
                "out of family: outside Tukey's far-out fences of the other folds' image features"),
        "flagged_cases": flagged,
    }, header="segplan quality check: what `segplan predict` writes to qc.csv with")
    sp = q["spearman"][q["chosen"]]
    lines = notes + [
        f"calibration ({c.scope} temperatures near {', '.join(f'{t:.3f}' for t in c.temperature['near'])}, far "
        f"{', '.join(f'{t:.3f}' for t in c.temperature['far'])}): ECE {c.ece_before:.4f} "
        f"-> {c.ece_after:.4f} on the voxels near the structures, {c.ece_all_before:.4f} -> {c.ece_all_after:.4f} "
        f"on all voxels (cross-fitted over folds {folds}; calibration.yaml, calibration.png)",
        f"quality check: score '{q['chosen']}' (expected Dice), Spearman {sp:.3f} with the cases' Dice "
        f"(cross-fitted; {len(rows)} cases); the flag caught {caught} of the worst {int(bad.sum())} cases and flagged "
        f"{good_flagged} of the other {int((~bad).sum())}; {int(family_out.sum())} of {len(rows)} training cases fell "
        "outside the other folds' family fences (qc.yaml)"]
    if not sp > 0:
        lines.append("quality check: no candidate score rises with the cases' Dice on these folds (too few cases, or "
                     "Dice too alike): its expected Dice says little; the out-of-family check still holds")
    if flagged:
        lines.append("flagged out-of-fold cases: " + ", ".join(f"{f['case']} (fold {f['fold']}, Dice {f['dice']:.3f}, "
                                                               f"expected {f['score']:.3f})" for f in flagged))
    return lines


def reliability_diagram(c: cal.CrossFit, path) -> None:
    """Accuracy against confidence per bin, before and after calibration (held-out folds), with
    how many voxels each bin holds."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.2))
    edges = np.linspace(0, 1, cal.BINS + 1)
    mid = (edges[:-1] + edges[1:]) / 2
    for name, curve, colour in (("before", c.curves["before"], "tab:red"), ("after", c.curves["after"], "tab:blue")):
        used = curve["weight"] > 0
        a1.plot(curve["confidence"][used], curve["accuracy"][used], "o-", color=colour,
                label=f"{name} (ECE {curve['ece']:.4f})")
        a2.bar(mid + (0.01 if name == "after" else -0.01), curve["weight"], width=0.02, color=colour, label=name)
    a1.plot([0, 1], [0, 1], "k--", lw=1, label="perfectly calibrated")
    a1.set(xlabel="confidence", ylabel="accuracy", title="reliability (voxels near the structures, held-out folds)",
           xlim=(0, 1), ylim=(0, 1))
    a1.legend(loc="upper left", fontsize=8)
    a2.set_yscale("log")
    a2.set(xlabel="confidence", ylabel="voxels", title="voxels per bin")
    a2.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
