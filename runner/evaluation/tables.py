"""CSV tables (history, per-case metrics, quantification): atomic writes, typed reads."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from segplan.planner.fileio import write_text

TEXT_COLUMNS = ("case", "class", "flagged", "reason")


def write_rows(rows: list[dict], path: Path, fields: list[str] | None = None) -> None:
    """Write dict rows as CSV under a temporary name, then rename; columns in first-seen order."""
    if not rows and fields is None:
        return
    keys = fields or list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, keys)
    w.writeheader()
    w.writerows(rows)
    write_text(Path(path), buf.getvalue())


def read_rows(path: Path) -> list[dict]:
    """Rows back with numbers as float ('epoch' as int), True/False as bool, text columns as text."""
    if not Path(path).exists():
        return []
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k, v in r.items():
            if k in TEXT_COLUMNS:
                continue
            if v in ("True", "False"):
                r[k] = v == "True"
            elif k == "epoch":
                r[k] = int(v)
            else:
                r[k] = float(v) if v not in ("", None) else math.nan
    return rows
