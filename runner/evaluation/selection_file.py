"""The file `segplan select` writes (``selection.yaml``): plain, commented YAML with the ranking and
Dice per class and label group, the winner, its postprocessing; checked on every read, each
problem named by key and line. Editing ``winner`` picks another candidate of the ranking; the
postprocessing was decided for ``postprocessing_for`` and is refused for another winner unless its
rules are emptied (or ``postprocessing_for`` is edited too, taking responsibility for it). A
selection made with ``--seconds-per-case`` also keeps each candidate's prediction settings (engine,
window overlap, test-time mirroring, number of folds) and its measured seconds per case; predict and
export use the winner's. ``format_ranking`` prints the file's ranking as the table
`segplan select` shows."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from segplan.planner.fileio import write_text
from segplan.planner.schema import Reader, SchemaError, doc, dump_yaml, load_yaml_with_lines
from segplan.runner.postprocessing import postprocess
from segplan.runner.postprocessing.postprocess import Postprocessing

SELECTION_VERSION = 1
DIGITS = 6  # Dice in the file: far finer than any difference between configurations that means something


class SelectionError(ValueError):
    """A selection file with problems, each as 'file:line: key: message', or plans that cannot be compared."""


@dataclass(frozen=True)
class PredictionSettings:  # explained once, above `ranking` in the file
    engine: Literal["keras", "onnxruntime", "openvino"] = doc("")
    overlap: float = doc("")
    mirroring: bool = doc("")
    folds: int = doc("")

    def inference(self) -> dict:
        """The plan's ``inference`` keys these settings replace."""
        return {"engine": self.engine, "overlap": self.overlap, "mirroring": self.mirroring}

    def describe(self) -> str:
        return (f"{self.engine}, overlap {self.overlap:g}, {'mirrored' if self.mirroring else 'no mirroring'}, "
                f"{self.folds} fold{'s' if self.folds > 1 else ''}")


@dataclass(frozen=True)
class Candidate:  # its fields are explained once, above `ranking` in the file
    name: str = doc("")
    plans: list[str] = doc("")
    mean_foreground_dice: float = doc("")
    dice: dict[str, float | None] = doc("")
    settings: PredictionSettings | None = doc("", default=None)
    seconds_per_case: float | None = doc("", default=None)
    dice_lower_bound: bool = doc("", default=False)


@dataclass(frozen=True)
class Selection:
    selection_version: int = doc("selection file format version")
    folds: int = doc("cross-validation folds of every plan (all finished, one split)")
    cases: int = doc("out-of-fold cases scored (every case of the dataset, each by the fold that held it out; with "
                     "--seconds-per-case the cases of `sample`)")
    labels: dict[str, int] = doc("the plans' labels, which they share")
    winner: str = doc("the candidate `segplan predict --selection` and `segplan export --selection` use: the best of "
                      "the ranking (edit to pick another of its names)")
    postprocessing_for: str = doc("the candidate whose out-of-fold predictions decided the postprocessing below")
    ranking: list[Candidate] = doc(
        "every plan alone and every pair averaged, best first. name: a configuration (a plan name where two plans "
        "share one), or two joined by '+', an ensemble averaging their probabilities; plans: its plan files, "
        "relative to this file; mean_foreground_dice: what ranks, the mean over the foreground classes (the "
        "regions of a region plan) of the mean Dice over the out-of-fold cases, nnU-Net's foreground_mean: a case "
        "where a class is absent from both prediction and reference is left out of that class's mean; dice: the "
        "mean Dice per class (region) and label group, null where the class is absent from every case and "
        "prediction. With --seconds-per-case also: settings (engine: what runs the network; overlap: window overlap; "
        "mirroring: test-time flips; folds: how many folds are averaged, folds 0..N-1), seconds_per_case (read, "
        "preprocess, network, back to the original grid, mean over `sample` on `machine`) and dice_lower_bound "
        "(true: a setting that cannot be scored out of fold, more than one fold, carries the Dice of its one-fold "
        "counterpart, which its own is expected to meet or beat)")
    postprocessing: Postprocessing = doc("decided on the winner's out-of-fold predictions (as `segplan postprocess`): "
                                         "applied to its label maps")
    regions: dict[str, list[int]] = doc("the plans' regions, which they share ({}: plans of labels)", default_factory=dict)
    seconds_per_case: float | None = doc(
        "the time per case the winner had to meet (`--seconds-per-case`; null: configurations only, with their "
        "plans' own prediction settings)", default=None)
    sample: list[str] = doc("the out-of-fold cases the settings were scored and timed on (each by the fold that held "
                            "it out; empty: no settings were searched)", default_factory=list)
    machine: str = doc("where the seconds were measured", default="")


def save_selection(sel: Selection, path: Path) -> None:
    header = ("segplan selection: the best configuration or ensemble on cross-validation (`segplan select`).\n"
              "`segplan predict --selection` and `segplan export --selection` use the winner; paths are relative "
              "to this file.")
    write_text(Path(path), dump_yaml(sel, header=header))


def format_ranking(sel: Selection) -> str:
    """The ranking as a table (seconds per case where settings were searched, mean foreground Dice,
    then Dice per class; '>=' marks a lower bound), the winner starred, and what it keeps."""
    classes = list(sel.ranking[0].dice) if sel.ranking else []
    timed = sel.seconds_per_case is not None
    width = max([len(c.name) for c in sel.ranking] + [9]) + 2
    head = (f"  {'candidate':<{width}}" + (f"{'s/case':>8}" if timed else "") + f"{'mean fg':>10}"
            + "".join(f"{c[:12]:>13}" for c in classes))
    rows = [f"{'*' if c.name == sel.winner else ' '} {c.name:<{width}}"
            + (f"{c.seconds_per_case:>8.2f}" if timed else "")
            + f"{('>=' if c.dice_lower_bound else '') + format(c.mean_foreground_dice, '.4f'):>10}"
            + "".join(f"{c.dice[k]:>13.4f}" if c.dice[k] is not None else f"{'absent':>13}" for k in classes)
            for c in sel.ranking]
    kept = ", ".join(f"largest component of {r.keep_largest}" for r in sel.postprocessing.rules) or "nothing"
    what = (f"{sel.cases} out-of-fold cases, {sel.folds} folds" if not timed else
            f"{sel.cases} out-of-fold cases ({', '.join(sel.sample[:4])}{', ...' if len(sel.sample) > 4 else ''}), "
            f"each predicted by the fold that held it out; seconds per case on {sel.machine}; '>=': several folds "
            "averaged, not scorable out of fold, carries its one-fold counterpart's Dice as a lower bound")
    limit = f" (the most accurate within {sel.seconds_per_case:g} s per case)" if timed else ""
    return "\n".join([f"{what}; mean Dice (mean fg: over the foreground classes, what ranks)", head, *rows,
                      f"winner: {sel.winner}{limit}; postprocessing decided on its configuration's out-of-fold "
                      f"predictions: keep {kept}"])


def load_selection(path: Path) -> Selection:
    """Read and check a selection file: every problem named with its key and line."""
    path = Path(path)
    if not path.is_file():
        raise SelectionError(f"{path}: no such selection file (`segplan select PLAN PLAN ... -o {path}` writes it)")
    try:
        data, lines = load_yaml_with_lines(path)
    except SchemaError as e:
        raise SelectionError("\n".join(e.problems)) from e
    reader = Reader(str(path), lines)
    if isinstance(data, dict) and data.get("selection_version") not in (None, SELECTION_VERSION):
        reader.error("selection_version", f"version {data.get('selection_version')!r} is unknown; this segplan reads "
                                          f"{SELECTION_VERSION}")
        raise SelectionError("\n".join(reader.errors))
    sel = reader.build(Selection, data)
    if not reader.errors:
        _check_selection(sel, reader, path.parent)
    if reader.errors:
        raise SelectionError("\n".join(reader.errors))
    return sel


def _check_selection(sel: Selection, r: Reader, base: Path) -> None:
    names = [c.name for c in sel.ranking]
    if not names:
        r.error("ranking", "is empty: `segplan select` lists every candidate")
    for i, c in enumerate(sel.ranking):
        if c.name in names[:i]:
            r.error(f"ranking.{i}.name", f"'{c.name}' appears twice")
        if not 1 <= len(c.plans) <= 2:
            r.error(f"ranking.{i}.plans", f"{len(c.plans)} plans; a candidate is one plan or a pair")
        for key, v in [("mean_foreground_dice", c.mean_foreground_dice)] + [(f"dice.{k}", v) for k, v in c.dice.items()
                                                                             if v is not None]:
            if not 0.0 <= v <= 1.0:  # NaN fails too
                r.error(f"ranking.{i}.{key}", f"{v} is not a Dice within [0, 1]")
        if c.seconds_per_case is not None and not c.seconds_per_case >= 0:
            r.error(f"ranking.{i}.seconds_per_case", f"{c.seconds_per_case} is not a time")
        if c.settings is not None:
            if not 0.0 <= c.settings.overlap < 1.0:
                r.error(f"ranking.{i}.settings.overlap", f"{c.settings.overlap} is not within [0, 1)")
            if not 1 <= c.settings.folds <= sel.folds:
                r.error(f"ranking.{i}.settings.folds", f"{c.settings.folds}: the plans have {sel.folds} folds")
    if sel.winner not in names:
        r.error("winner", f"'{sel.winner}' is not a name in ranking ({', '.join(names)})")
    else:
        i = names.index(sel.winner)
        channels = set()
        for j, rel in enumerate(sel.ranking[i].plans):
            plan = _member_plan(base / rel, r, f"ranking.{i}.plans.{j}")
            if plan is not None and plan.dataset.labels != sel.labels:
                r.error(f"ranking.{i}.plans.{j}", f"{rel} segments {plan.dataset.labels}, the selection {sel.labels}")
            if plan is not None and plan.dataset.regions != sel.regions:
                r.error(f"ranking.{i}.plans.{j}", f"{rel} has regions {plan.dataset.regions or 'none'}, the selection "
                                                  f"{sel.regions or 'none'}")
            if plan is not None:
                channels.add(len(plan.dataset.channels))
        if len(channels) > 1:
            r.error(f"ranking.{i}.plans", "the plans read other numbers of channels per case")
    postprocess.check_rules(r, sel.postprocessing, sel.labels, "postprocessing.")
    plans = {c.name: c.plans for c in sel.ranking}
    same = sel.postprocessing_for in plans and plans[sel.postprocessing_for] == plans.get(sel.winner)
    if sel.postprocessing_for != sel.winner and not same and sel.postprocessing.rules:   # other settings: same plans
        r.error("postprocessing_for", f"the postprocessing was decided for '{sel.postprocessing_for}', the winner is "
                                      f"'{sel.winner}': run `segplan select` again, or empty postprocessing.rules (or "
                                      "set postprocessing_for to the winner to apply them anyway)")


def _member_plan(path: Path, r: Reader, key: str):
    from segplan.planner.plan_file import load_plan
    if not path.is_file():
        r.error(key, f"plan file {path} does not exist")
        return None
    try:
        return load_plan(path)
    except SchemaError as e:
        r.error(key, f"{path} is not a valid plan: {e.problems[0]}")
        return None
