"""`segplan summarize`: the cross-validation report over the finished folds (the paper's Table 1,
Figure 5 box plots, Figure 6 overlays) and per-case quantification for disease monitoring."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402

from segplan.planner.dataset import read_image, read_label  # noqa: E402
from segplan.planner.fileio import save_figure, write_text, write_yaml  # noqa: E402
from segplan.planner.plan import Plan  # noqa: E402
from segplan.planner.schema import to_plain  # noqa: E402
from segplan.runner.evaluation.html_report import write_report  # noqa: E402
from segplan.runner.postprocessing.postprocess import current, postprocessed_rows  # noqa: E402
from segplan.planner.labels import label_model  # noqa: E402
from segplan.runner.evaluation.tables import read_rows, write_rows  # noqa: E402
from segplan.runner.trust.fit import fit_trust  # noqa: E402
from segplan.runner.workspace import Workspace  # noqa: E402

TABLE_METRICS = ("dice", "sensitivity", "specificity")


def _defined(values) -> list[float]:
    """The values that are numbers (NaN marks an undefined metric)."""
    return [float(v) for v in values if v is not None and not math.isnan(float(v))]


def _stat(fn, values) -> float | None:
    ok = _defined(values)
    return float(fn(ok)) if ok else None


def fold_table(rows_by_fold: dict[int, list[dict]], classes: list[str]) -> dict:
    """Per fold the median over its validation cases of each metric and class, plus the mean row.

    A case where a metric is undefined (sensitivity with an empty reference: NaN in the rows) is
    left out of that median, never counted as 0; a fold with no defined case has None there, and
    the mean row averages the folds that have a value (None if none has)."""
    table = {}
    for k, rows in rows_by_fold.items():
        table[f"fold {k}"] = {c: {m: _stat(np.median, [r[m] for r in rows if r["class"] == c]) for m in TABLE_METRICS}
                              for c in classes if any(r["class"] == c for r in rows)}
    if table:
        table["average"] = {c: {m: _stat(np.mean, [f[c][m] for f in table.values() if c in f]) for m in TABLE_METRICS}
                            for c in classes}
    return table


def undefined_notes(rows_by_fold: dict[int, list[dict]], classes: list[str]) -> list[str]:
    """One line per fold and class whose medians left cases out because a metric was undefined there."""
    notes = []
    for k, rows in rows_by_fold.items():
        for c in classes:
            for m in TABLE_METRICS:
                n = sum(1 for r in rows if r["class"] == c and math.isnan(float(r[m])))
                if n:
                    why = ("the reference is empty: nothing to detect" if m == "sensitivity"
                           else "the reference fills the image")
                    notes.append(f"fold {k}: {c} {m} undefined in {n} validation case(s) ({why}), left out of "
                                 "its median (n/a where no case defines it)")
    return notes


def _cell(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def _markdown(table: dict, classes: list[str], missing: list[int], notes: list[str] | None = None) -> str:
    head = "| | " + " | ".join(f"{c} {m[:4]}" for c in classes for m in TABLE_METRICS) + " |"
    lines = ["# Cross-validation summary", "", "Median over each fold's validation cases (the paper's Table 1).", "",
             *(notes or []), head, "|" + "---|" * (1 + len(classes) * len(TABLE_METRICS))]
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join(_cell(row.get(c, {}).get(m)) for c in classes
                                                 for m in TABLE_METRICS) + " |")
    if missing:
        lines += ["", f"Folds not finished yet: {', '.join(map(str, missing))}."]
    lines += ["", "![per-case metrics](cv_boxplots.png)", "", "Best and worst cases: `overlays/`."]
    return "\n".join(lines) + "\n"


def _boxplots(rows: list[dict], classes: list[str], path: Path) -> None:
    fig, axes = plt.subplots(1, len(TABLE_METRICS), figsize=(5 * len(TABLE_METRICS), 4))
    for ax, m in zip(axes, TABLE_METRICS):
        ax.boxplot([_defined(r[m] for r in rows if r["class"] == c) for c in classes])
        ax.set_xticks(range(1, len(classes) + 1), classes, rotation=30)
        ax.set(title=m, ylim=(0, 1.02))
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def _overlay(ws: Workspace, case_id: str, pred_path: Path, path: Path, title: str) -> None:
    """Three axial slices through the foreground: image, reference, prediction (the paper's Figure 6)."""
    case = next(c for c in ws.dataset.cases if c.case_id == case_id)
    img = read_image(case)[0][0]
    ref = read_label(case.label_file)[0]
    pred = read_label(pred_path)[0]
    ignore = ws.plan.dataset.ignore_label
    zs = np.flatnonzero(((ref != 0) & (ref != ignore) if ignore is not None else ref != 0).reshape(ref.shape[0], -1)
                        .any(1))
    zs = zs if zs.size else np.arange(ref.shape[0])
    picks = [zs[len(zs) // 4], zs[len(zs) // 2], zs[3 * len(zs) // 4]]
    fig, axes = plt.subplots(3, 3, figsize=(9, 9))
    lo, hi = np.percentile(img, [1, 99])
    for row, z in zip(axes, picks):
        for ax, (name, lab) in zip(row, (("image", None), ("reference", ref), ("prediction", pred))):
            ax.imshow(img[z], cmap="gray", vmin=lo, vmax=hi)
            if lab is not None:   # background and unannotated voxels (the ignore label) uncoloured
                hidden = (lab[z] == 0) | (lab[z] == ignore if ignore is not None else False)
                ax.imshow(np.ma.masked_where(hidden, lab[z]), cmap="tab10", alpha=0.5, vmin=0, vmax=10,
                          interpolation="nearest")
            ax.set_title(f"{name} z={z}" + (" (unannotated: uncoloured)" if name == "reference" and ignore is not None
                                            else ""), fontsize=8)
            ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=80)
    plt.close(fig)


def quantification(rows: list[dict], plan: Plan) -> list[dict]:
    """Per case: predicted volume of each label (of each region, for a region plan) in ml and, for
    each label group containing lungs, the percent of each lung occupied by the infection-like
    remaining labels."""
    out = []
    labels = list(label_model(plan).structures)
    for case in dict.fromkeys(r["case"] for r in rows):
        sel = {r["class"]: r for r in rows if r["case"] == case}
        q = {"case": case, **{f"{n}_ml": round(sel[n]["pred_ml"], 2) for n in labels if n in sel}}
        lungs = [n for n in labels if "lung" in n.lower()]
        infection = [n for n in labels if "infect" in n.lower() or "lesion" in n.lower()]
        if lungs and infection:
            inf = sum(sel[n]["pred_ml"] for n in infection if n in sel)
            total = sum(sel[n]["pred_ml"] for n in lungs if n in sel) + inf
            q["infection_percent_of_lungs"] = round(100 * inf / total, 2) if total else 0.0
        out.append(q)
    return out


def report_notes(ws: Workspace, folds: list[int]) -> list[str]:
    """What a reader must know beside the numbers: how groups are scored, which checkpoint predicted,
    whether anything was chosen on the validation cases, missing predictions."""
    notes = []
    notes += [n + (" (each fold's summary.yaml says how many)" if "ignore" in n else "")
              for n in label_model(ws.plan).note()]
    for g, members in ws.plan.dataset.label_groups.items():
        notes.append(f"{g}: per case the mean of {' and '.join(members)} (the paper's definition); "
                     f"{g}_union: their union, which forgives a {'/'.join(members)} swap")
    for k in folds:
        summary = ws.fold(k).validation_summary
        meta = yaml.safe_load(summary.read_text()) if summary.exists() else {}
        notes.append(f"fold {k}: predicted with the {meta.get('checkpoint', 'unrecorded')} checkpoint"
                     + (f"; {meta['selection_note']}" if meta.get("selection_note") else ""))
        if meta.get("missing_predictions"):
            notes.append(f"fold {k}: MISSING predictions scored as Dice 0: {', '.join(meta['missing_predictions'])}")
    return notes


def summarize(ws: Workspace) -> str:
    """Write WORK/cv_summary.{yaml,md}, cv_boxplots.png, overlays/ and quantification.csv; with two or
    more validated folds also the calibration (calibration.yaml, calibration.png) and the quality
    model (qc.yaml) that `segplan predict` uses, their figures and flagged cases in the notes."""
    plan = ws.plan
    rows_by_fold, missing = {}, []
    for fold in ws.folds():
        if fold.validation_metrics.exists():
            rows_by_fold[fold.index] = read_rows(fold.validation_metrics)
        else:
            missing.append(fold.index)
    if not rows_by_fold:
        return f"no finished fold in {ws.root}: run `segplan run {ws.plan_path} --fold K` first (missing {missing})"
    classes = list(dict.fromkeys(r["class"] for rows in rows_by_fold.values() for r in rows))
    table = fold_table(rows_by_fold, classes)
    post, said = current(ws, sorted(rows_by_fold))
    notes = report_notes(ws, list(rows_by_fold)) + undefined_notes(rows_by_fold, classes) + [said]
    notes += fit_trust(ws)   # calibration and quality check, cross-fitted on the folds (runner/trust)
    # both rows: as predicted, and after the postprocessing the folds chose
    table_post = fold_table(postprocessed_rows(ws, post), classes) if post.rules else {}
    write_yaml(ws.cv_summary_yaml, to_plain({"folds": table, "folds_postprocessed": table_post,
                                             "missing_folds": missing, "notes": notes}))
    shown = table | {f"{name} (postprocessed)": row for name, row in table_post.items()}
    markdown = _markdown(shown, classes, missing, [f"- {n}" for n in notes] + [""])
    write_text(ws.cv_summary_md, markdown)
    all_rows = [dict(r, fold=k) for k, rows in rows_by_fold.items() for r in rows]
    _boxplots(all_rows, classes, ws.cv_boxplots)
    write_rows(quantification(all_rows, plan), ws.quantification)
    write_report(ws, shown, classes, notes, missing, all_rows)  # cv_report.html: the same, to look at
    main_cls = next((g for g in plan.dataset.label_groups), classes[0])
    ranked = sorted((r for r in all_rows if r["class"] == main_cls), key=lambda r: r["dice"])
    ws.overlays.mkdir(exist_ok=True)
    for tag, r in (("worst", ranked[0]), ("best", ranked[-1])):
        pred = ws.fold(int(r["fold"])).validation / f"{r['case']}.nii.gz"
        _overlay(ws, r["case"], pred, ws.overlays / f"{tag}_{r['case']}.png",
                 f"{tag}: {r['case']} ({main_cls} Dice {r['dice']:.3f})")
    trust = ", calibration.yaml, calibration.png, qc.yaml" if ws.qc_model.exists() else ""
    return (markdown + f"\nwritten: {ws.cv_summary_md}, cv_summary.yaml, cv_report.html, cv_boxplots.png, "
            f"quantification.csv, overlays/{trust}")
