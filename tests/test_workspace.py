"""The workspace (issue 11): one owner of the work folder's paths, each fold's frozen plan, and an
import graph without circles."""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
from pathlib import Path

import pytest

from segplan.planner.plan_file import load_plan, save_plan
from segplan.planner.schema import SchemaError
from segplan.runner.workspace import PlanChanged, Workspace, changed_keys
from tests.tiny import tiny_plan

ROOT = Path(__file__).resolve().parents[1]
needs_keras = pytest.mark.skipif(importlib.util.find_spec("keras") is None, reason="keras is not installed")


def _edit_network(plan_path: Path, **changes) -> None:
    plan = load_plan(plan_path)
    save_plan(plan.replace(network=dataclasses.replace(plan.network, **changes)), plan_path)


def test_changed_keys_name_the_weight_fields_only(phantoms, tmp_path):
    plan = load_plan(tiny_plan(phantoms, tmp_path / "p.yaml"))
    wider = plan.replace(network=dataclasses.replace(plan.network, filters=[8, 16, 32]))
    longer = plan.replace(training=dataclasses.replace(plan.training, learning_rate=0.5))
    relabelled = plan.replace(dataset=dataclasses.replace(plan.dataset, labels={**plan.dataset.labels, "infection": 9}))
    assert changed_keys(plan, wider) == ["network.filters"]
    assert changed_keys(plan, longer) == []
    assert changed_keys(plan, relabelled) == ["dataset.labels.infection"]


@needs_keras
def test_frozen_plan_refuses_edits_and_prediction_uses_it(phantoms, tmp_path):
    from segplan.runner.inference.predict import predict_folder
    from segplan.runner.training.train import train_fold
    plan_path = tiny_plan(phantoms, tmp_path / "p.yaml", epochs=1, iterations=2)
    fold = train_fold(Workspace(plan_path), 0, progress=False)
    frozen_text = fold.frozen_plan.read_text()
    # the user widens the network after training: resuming refuses, naming the key
    _edit_network(plan_path, filters=[8, 16, 32])
    with pytest.raises(PlanChanged, match=r"fold 0 was trained with other values of network\.filters"):
        Workspace(plan_path).fold_plan(0)
    with pytest.raises(PlanChanged, match="network.filters"):
        (fold.finished).unlink()
        train_fold(Workspace(plan_path), 0, resume=True, progress=False)
    assert fold.frozen_plan.read_text() == frozen_text  # never rewritten once weights exist
    # an edit of what the weights do not depend on is honoured, the frozen network is used
    _edit_network(plan_path, filters=[4, 8, 16])
    plan = load_plan(plan_path)
    save_plan(plan.replace(inference=dataclasses.replace(plan.inference, overlap=0.25)), plan_path)
    ws = Workspace(plan_path)
    assert ws.fold_plan(0).inference.overlap == 0.25 and ws.fold_plan(0).network.filters == [4, 8, 16]
    case = next(iter(ws.dataset.cases))
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / case.image_files[0].name).symlink_to(case.image_files[0])
    _edit_network(plan_path, filters=[4, 8, 16], activation="leaky_relu")  # not a weight shape, still refused
    with pytest.raises(PlanChanged, match="network.activation"):
        predict_folder(plan_path, inp, tmp_path / "out", folds=[0], progress=False)
    # --restart takes the edited plan as the new frozen one
    train_fold(Workspace(plan_path), 0, restart=True, progress=False)
    assert load_plan(fold.frozen_plan, check_paths=False).network.activation == "leaky_relu"
    predict_folder(plan_path, inp, tmp_path / "out", folds=[0], progress=False)
    assert (tmp_path / "out" / f"{case.case_id}.nii.gz").exists()


def test_fold_paths_come_from_the_workspace(phantoms, tmp_path):
    plan_path = tiny_plan(phantoms, tmp_path / "p.yaml")
    ws = Workspace(plan_path)
    f = ws.fold(1)
    assert f.dir == ws.root / "fold_1" and f.validation_summary == f.dir / "validation" / "summary.yaml"
    assert ws.preprocessed.parent == (ws.root / "preprocessed").resolve()
    with pytest.raises(ValueError, match="folds 0..1"):
        ws.fold(2)
    splits = ws.splits()
    assert ws.splits_file.exists() and len(splits) == 2 and ws.splits() == splits


def test_check_refuses_dataset_zscore_without_ct(phantoms, tmp_path):
    plan_path = tiny_plan(phantoms, tmp_path / "p.yaml")
    plan = load_plan(plan_path)
    norm = [dataclasses.replace(n, scheme="zscore", zscore="dataset") for n in plan.intensity.normalization]
    save_plan(plan.replace(intensity=dataclasses.replace(plan.intensity, normalization=norm)), plan_path)
    with pytest.raises(SchemaError, match=r"intensity\.normalization\.0\.zscore: 'dataset' needs scheme: ct"):
        load_plan(plan_path)


def test_failed_probe_says_why(phantoms, tmp_path, monkeypatch):
    from segplan.planner import cpu_plan, probing
    from segplan.planner.fingerprint import compute_fingerprint
    from segplan.planner.layouts import load_dataset
    fp = compute_fingerprint(load_dataset(phantoms), progress=False)
    monkeypatch.setattr(probing, "PROBE_TIMEOUT_S", 60)
    bad = {"filters": [1], "pool_sizes": [], "kernel_sizes": [[3, 3, 3]], "convs_per_stage": 2,
           "normalization": "batch", "batchnorm_momentum": 0.99, "activation": "relu", "upsampling": "transpose",
           "unknown_setting": 1}
    seconds, why = probing.run_probe([{"filters": [4], "pool_sizes": [], "kernel_sizes": [[3, 3, 3]],
                                        "patch": [8, 8, 8], "batch": 1}], bad, {}, 1, 2)
    assert seconds is None and why.startswith("the probe failed:") and "unknown_setting" in why
    plan, reasons = cpu_plan.make_cpu_plan(fp, "p", "ds", "work", probe=False)
    assert reasons["network.filters"].startswith("no probe run")


PACKAGES = ("planner", "runner", "datasets")   # the folders that install as segplan.planner, ...


def _modules() -> dict[str, Path]:
    """Every module of the three folders by its installed name (segplan.runner.training.train, ...)."""
    mods = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = f.relative_to(ROOT).with_suffix("").parts
            mods[".".join(("segplan",) + (parts[:-1] if parts[-1] == "__init__" else parts))] = f
    return mods


def _runner_imports() -> dict[str, set[str]]:
    """Module -> the segplan modules it imports (at any depth of the file, functions included); an
    import of the bare folders' names (``from runner.x import``, which works only inside the
    repository) is kept as it is written, so that the test below names it."""
    mods = _modules()
    graph = {}
    for mod, f in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("segplan", *PACKAGES):
                for a in node.names:   # ``from segplan.runner.postprocessing import postprocess``: the module
                    deps.add(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.split(".")[0] in ("segplan", *PACKAGES)}
        graph[mod] = deps - {mod}
    return graph


def test_import_graph_has_no_circle_and_the_planner_no_runner():
    graph = _runner_imports()
    bare = sorted(f"{m} imports {d}" for m, ds in graph.items() for d in ds if not d.startswith("segplan."))
    assert not bare, f"imports of the repository's folders instead of the installed package: {bare}"

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for d in graph.get(todo.pop(), ()):
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
        return seen
    circles = sorted(m for m in graph if m in reach(m))
    assert not circles, f"import circles through {circles}"
    assert not [m for m in graph if m.startswith("segplan.planner.")
                and any(d.startswith("segplan.runner") for d in graph[m])]
    # the steps do not know each other: training does not predict, prediction does not train
    train, predict = "segplan.runner.training.train", "segplan.runner.inference.predict"
    assert predict not in reach(train) and train not in reach(predict)


def test_stages_are_folders_and_modules_stay_small():
    """runner/ shows the pipeline's stages (issue 39): at most 15 modules at its top, each stage a
    folder; no module of the three folders over 350 lines."""
    top = sorted(f.name for f in (ROOT / "runner").glob("*.py"))
    assert len(top) <= 15, top
    assert {"preprocessing", "training", "inference", "evaluation", "postprocessing"} <= {
        d.name for d in (ROOT / "runner").iterdir() if (d / "__init__.py").exists()}
    long = {str(f.relative_to(ROOT)): n for f in _modules().values()
            if (n := len(f.read_text().splitlines())) > 350}
    assert not long, long


def test_nothing_else_formats_a_fold_folder():
    offenders = [str(f.relative_to(ROOT)) for pkg in (*PACKAGES, "benchmarks")
                 for f in (ROOT / pkg).rglob("*.py") if f.name != "workspace.py" and 'f"fold_{' in f.read_text()]
    assert not offenders, offenders
