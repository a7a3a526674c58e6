"""Hand edits of a real plan (hypothesis): a key deleted at any depth, a value replaced by nothing, a
negative or huge number, text, a list of the wrong length or a nested mapping. `segplan check` either
accepts the edited plan or refuses it, exit status 2, naming the edited key (or the mapping or list
around it, or a key inside what replaced it); never a traceback, and never a NaN or infinity accepted as a number."""
from __future__ import annotations

import contextlib
import io
import math
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segplan.planner.plan_file import load_plan
from segplan.planner.planning import plan_dataset
from segplan.planner.schema import to_plain
from segplan.runner.cli import main


@pytest.fixture(scope="module")
def plans(phantoms, tmp_path_factory) -> dict[str, dict]:
    """A GPU plan and a CPU plan of the phantoms, as the planner wrote them, parsed."""
    folder = tmp_path_factory.mktemp("edits")
    out = {}
    for preset in ("default", "cpu"):
        path = folder / f"{preset}.yaml"
        plan_dataset(phantoms, path, gpu_memory=8, preset=preset, workers=1, progress=False, time_budget=None,
                     probe=False)
        assert _check(path)[0] == 0
        out[preset] = yaml.safe_load(path.read_text())
    out["folder"] = folder
    return out


def _check(path: Path) -> tuple[int, str, str]:
    """`segplan check PATH` in this process: exit status, stdout, stderr."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(["check", str(path)])
    return rc, stdout.getvalue(), stderr.getvalue()


def _places(node, at: tuple = ()) -> list[tuple]:
    """The path (keys and list indices) of every value in a parsed plan, the document itself left out."""
    out = [at] if at else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _places(v, at + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _places(v, at + (i,))
    return out


def _dotted(at: tuple) -> str:
    return ".".join(map(str, at))


_KEY = st.from_regex(r"[a-z_]{1,8}", fullmatch=True)
_HOSTILE = st.one_of(
    st.none(),
    st.integers(-10**6, -1),
    st.floats(-1e6, -1e-9),
    st.sampled_from([0, 0.0, 10**30, -10**30, 2**63, 1e308, -1e308, math.inf, -math.inf, math.nan]),
    st.text(max_size=10),
    st.booleans(),
    st.lists(st.integers(-5, 10**6), max_size=6),
    st.lists(st.one_of(st.none(), st.text(max_size=3), st.lists(st.integers(0, 3), max_size=4)), max_size=4),
    st.dictionaries(_KEY, st.one_of(st.none(), st.integers(), st.text(max_size=3),
                                    st.dictionaries(_KEY, st.integers(), max_size=2)), max_size=3),
)


@st.composite
def edits(draw, plans_: dict):
    """(the edited plan, the dotted key edited, what was done)."""
    data = yaml.safe_load(yaml.safe_dump(plans_[draw(st.sampled_from(["default", "cpu"]))]))  # a deep copy
    at = draw(st.sampled_from(_places(data)))
    parent = data
    for k in at[:-1]:
        parent = parent[k]
    old = parent[at[-1]]
    kinds = ["delete", "replace"] + (["shorten", "lengthen"] if isinstance(old, list) else []) + ["nest"]
    kind = draw(st.sampled_from(kinds))
    if kind == "delete":
        del parent[at[-1]]  # a list item deleted leaves a list one shorter
    elif kind == "replace":
        parent[at[-1]] = draw(_HOSTILE)
    elif kind == "shorten":
        parent[at[-1]] = old[:draw(st.integers(0, max(0, len(old) - 1)))]
    elif kind == "lengthen":
        parent[at[-1]] = old + [draw(st.sampled_from(old or [1]))] * draw(st.integers(1, 3))
    else:
        parent[at[-1]] = {draw(_KEY): old}
    return data, _dotted(at), kind


def _non_finite(value) -> bool:
    if isinstance(value, dict):
        return any(_non_finite(v) for v in value.values())
    if isinstance(value, list):
        return any(_non_finite(v) for v in value)
    return isinstance(value, float) and not math.isfinite(value)


def _named_keys(stderr: str, path: Path) -> list[str]:
    """The keys a refusal names: the key of each 'FILE:LINE: KEY: message' line, and the dotted keys
    its messages mention."""
    keys = []
    for line in stderr.splitlines():
        line = line.strip()
        where = re.match(rf"{re.escape(str(path))}(?::\d+)?: (.+?): ", line)
        if where:
            keys.append(where.group(1))
        keys += [w.strip("'\",;()[]") for w in line.split() if "." in w.strip("'\",;()[].:") and str(path) not in w]
    return [k.rstrip(".:") for k in keys]


def _related(key: str, edited: str) -> bool:
    return key == edited or key.startswith(edited + ".") or edited.startswith(key + ".")


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data())
def test_an_edited_plan_passes_or_is_refused_naming_the_key(plans, data):
    plan, edited, kind = data.draw(edits(plans))
    path = plans["folder"] / "edited.yaml"
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    rc, out, err = _check(path)  # an exception here is the traceback a user would see
    if rc == 0:
        assert "valid plan" in out
        assert not _non_finite(to_plain(load_plan(path))), f"{kind} {edited}: a NaN or infinity passed"
        return
    assert rc == 2 and err.startswith(("segplan: the plan has problems:", "segplan: error:")), (rc, err)
    named = _named_keys(err, path)
    assert any(_related(k, edited) for k in named), f"{kind} {edited}: the refusal names {named}:\n{err}"


def test_configuration_defaults_and_previous_stage_checked(plans):
    """A plan written before the configuration family loads as 3d_fullres; a cascade plan without
    its low-resolution plan, or a previous stage on any other configuration, is refused by name."""
    folder, data = plans["folder"], dict(plans["default"])
    old = {k: v for k, v in data.items() if k not in ("configuration", "previous_stage")}
    (folder / "old.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    plan = load_plan(folder / "old.yaml")
    assert plan.configuration == "3d_fullres" and plan.previous_stage is None
    (folder / "cascade.yaml").write_text(yaml.safe_dump(old | {"configuration": "3d_cascade_fullres"}, sort_keys=False))
    rc, _, err = _check(folder / "cascade.yaml")
    assert rc == 2 and "previous_stage" in err
    (folder / "stray.yaml").write_text(yaml.safe_dump(old | {"previous_stage": "low.yaml"}, sort_keys=False))
    rc, _, err = _check(folder / "stray.yaml")
    assert rc == 2 and "previous_stage" in err and "3d_fullres" in err
