"""The cross-validation table with undefined values: a case whose reference is empty has no
sensitivity, and the medians, the mean row, the YAML and the Markdown say so instead of a 0 or nan."""
import math

import pytest
import yaml

from segplan.planner.fileio import write_yaml
from segplan.planner.schema import to_plain
from segplan.runner.evaluation.report import _markdown, fold_table, undefined_notes


def _row(case, cls, dice, sens, spec=0.99):
    return {"case": case, "class": cls, "dice": dice, "sensitivity": sens, "specificity": spec}


def test_undefined_sensitivity_is_left_out_and_shown_as_such(tmp_path):
    nan = math.nan
    rows = {0: [_row("a", "lesion", 0.8, 0.9), _row("b", "lesion", 0.0, nan), _row("c", "lesion", 0.6, 0.5)],
            1: [_row("d", "lesion", 1.0, nan), _row("e", "lesion", 0.0, nan)]}   # no lesion in fold 1's references
    table = fold_table(rows, ["lesion"])
    assert table["fold 0"]["lesion"]["sensitivity"] == pytest.approx(0.7)    # median of 0.9 and 0.5, not of 0 too
    assert table["fold 0"]["lesion"]["dice"] == pytest.approx(0.6)
    assert table["fold 1"]["lesion"]["sensitivity"] is None
    assert table["average"]["lesion"]["sensitivity"] == pytest.approx(0.7)   # the fold that has one
    assert table["average"]["lesion"]["dice"] == pytest.approx((0.6 + 0.5) / 2)
    write_yaml(tmp_path / "cv.yaml", to_plain({"folds": table}))
    assert yaml.safe_load((tmp_path / "cv.yaml").read_text())["folds"]["fold 1"]["lesion"]["sensitivity"] is None
    notes = undefined_notes(rows, ["lesion"])
    assert notes == [f"fold {k}: lesion sensitivity undefined in {n} validation case(s) (the reference is empty: "
                     "nothing to detect), left out of its median (n/a where no case defines it)"
                     for k, n in ((0, 1), (1, 2))]
    md = _markdown(table, ["lesion"], [], notes)
    fold1 = next(line for line in md.splitlines() if line.startswith("| fold 1 |"))
    assert fold1 == "| fold 1 | 0.500 | n/a | 0.990 |" and "nan" not in md
