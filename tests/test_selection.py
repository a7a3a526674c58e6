"""`segplan select` (issue 22): ranks each plan and every pairwise ensemble on hand-made out-of-fold
probabilities exactly as Dice computed here in numpy says (the ensemble of two is the mean of their
probabilities), decides the winner's postprocessing, writes a checked, hand-editable selection
file, and refuses unfinished folds, other splits and other labels by name. No training: the
probability files are written the way `segplan run` writes them."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from segplan.planner.dataset import read_label
from segplan.planner.plan_file import load_plan, save_plan
from segplan.runner.cli import main
from segplan.runner.postprocessing.postprocess import choose
from segplan.runner.evaluation.selection import SelectionError, load_selection
from segplan.runner.workspace import Workspace
from tests.tiny import tiny_plan

# plan name -> (configuration, share of the probabilities that is noise): the lower the noise, the
# better the plan alone; two noisy plans averaged beat either (their noise is independent)
# (the cascade is one by name only: no previous stage is read here)
PLANS = {"full": ("3d_fullres", 0.62), "low": ("3d_lowres", 0.64), "cas": ("3d_cascade_fullres", 0.8)}


def _variant(base: Path, name: str, configuration: str, **changes) -> Path:
    """A copy of the plan at ``base`` with its own name, configuration and work folder (a user's edit)."""
    plan = load_plan(base)
    plan = plan.replace(**{"name": name, "configuration": configuration,
                           "previous_stage": "low.yaml" if configuration == "3d_cascade_fullres" else None,
                           "dataset": dataclasses.replace(plan.dataset, work_dir=f"work/{name}"), **changes})
    path = base.with_name(f"{name}.yaml")
    save_plan(plan, path)
    return path


def _cli(args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def _one_hot(classes: np.ndarray, k: int) -> np.ndarray:
    return np.stack([classes == c for c in range(k)]).astype(np.float32)


def _fake_cv(plan_path: Path, noise: float, seed: int) -> None:
    """Every fold 'finished' (checkpoint pointer, finished.json) with float16 out-of-fold
    probabilities per validation case: the reference one-hot blended with Dirichlet noise."""
    ws = Workspace(plan_path)
    labels = list(ws.plan.dataset.labels.values())
    rng = np.random.default_rng(seed)
    files = {c.case_id: c.label_file for c in ws.dataset.cases}
    for k, split in enumerate(ws.splits()):
        fold = ws.fold(k)
        fold.validation.mkdir(parents=True)
        fold.pointer.write_text(json.dumps({"weights": "ckpt.weights.h5"}))
        fold.finished.write_text("{}")
        for cid in split["val"]:
            ref = read_label(files[cid])[0]
            classes = np.searchsorted(labels, ref)
            rand = rng.dirichlet(np.full(len(labels), 0.3), size=ref.shape)
            probs = (1 - noise) * _one_hot(classes, len(labels)) + noise * np.moveaxis(rand, -1, 0)
            np.savez_compressed(fold.validation_probabilities(cid), probabilities=probs.astype(np.float16))


def _dice(pred: np.ndarray, ref: np.ndarray, value: int) -> float:
    p, r = pred == value, ref == value
    return 1.0 if not (p.any() or r.any()) else 2 * np.sum(p & r) / (np.sum(p) + np.sum(r))


def _expected(paths: dict[str, Path], members: tuple[str, ...]) -> tuple[dict[str, float], list]:
    """Mean Dice per class over all out-of-fold cases of the argmax of the members' mean probabilities,
    computed here from the files; and the (prediction, reference) pairs."""
    wss = [Workspace(paths[m]) for m in members]
    labels = wss[0].plan.dataset.labels
    values = np.array(list(labels.values()))
    files = {c.case_id: c.label_file for c in wss[0].dataset.cases}
    dice: dict[str, list[float]] = {n: [] for n, v in labels.items() if v}
    pairs = []
    for k, split in enumerate(wss[0].splits()):
        for cid in split["val"]:
            ref = read_label(files[cid])[0]
            mean = sum(np.load(ws.fold(k).validation_probabilities(cid))["probabilities"].astype(np.float32)
                       for ws in wss) / len(wss)
            pred = values[np.argmax(mean, axis=0)].astype(np.uint8)
            pairs.append((pred, ref))
            for n in dice:
                dice[n].append(_dice(pred, ref, labels[n]))
    return {n: float(np.mean(v)) for n, v in dice.items()}, pairs


@pytest.fixture(scope="module")
def hand_made(phantoms, tmp_path_factory) -> dict[str, Path]:
    """Three plans (3d_fullres, 3d_lowres, 3d_cascade_fullres) on one split,
    every fold 'finished' with hand-made out-of-fold probabilities."""
    root = tmp_path_factory.mktemp("select")
    base = tiny_plan(phantoms, root / "plans" / "base.yaml", folds=2)
    paths = {}
    for i, (name, (configuration, noise)) in enumerate(PLANS.items()):
        paths[name] = _variant(base, name, configuration)
        _fake_cv(paths[name], noise, seed=i)
    return paths


def test_select_ranks_singles_and_pairs_by_mean_foreground_dice_computed_independently(hand_made, tmp_path,
                                                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)   # the default output: selection.yaml in the current folder
    rc, out, err = _cli(["select", hand_made["cas"], hand_made["full"], hand_made["low"]])
    assert rc == 0, err
    sel = load_selection(tmp_path / "selection.yaml")
    names = {"full": "3d_fullres", "low": "3d_lowres", "cas": "3d_cascade_fullres"}
    expected = {}
    for members in [(m,) for m in names] + list(itertools.combinations(names, 2)):
        dice, pairs = _expected(hand_made, members)
        # named by configuration, in the family's order, whatever the order given
        name = "+".join(names[m] for m in sorted(members, key=lambda m: ["full", "low", "cas"].index(m)))
        expected[name] = (float(np.mean(list(dice.values()))), dice, pairs)
    assert len(sel.ranking) == 6 and {c.name for c in sel.ranking} == set(expected)
    for cand in sel.ranking:
        mean, dice, _ = expected[cand.name]
        assert cand.mean_foreground_dice == pytest.approx(mean, abs=1e-6), cand.name
        for cls, value in dice.items():
            assert cand.dice[cls] == pytest.approx(value, abs=1e-6), (cand.name, cls)
        assert "lungs" in cand.dice and "lungs_union" in cand.dice            # label groups too
    order = sorted(expected, key=lambda n: -expected[n][0])
    assert [c.name for c in sel.ranking] == order
    # the two least noisy plans averaged win over each alone (their noise is independent)
    assert sel.winner == "3d_fullres+3d_lowres" == order[0]
    assert expected["3d_fullres+3d_lowres"][0] > expected["3d_fullres"][0] > expected["3d_lowres"][0]
    assert [(tmp_path / p).resolve() for p in sel.ranking[0].plans] == [hand_made["full"].resolve(),
                                                                        hand_made["low"].resolve()]
    # its postprocessing: decided on the winner's out-of-fold predictions
    pairs = expected["3d_fullres+3d_lowres"][2]
    plan = load_plan(hand_made["full"])
    assert sel.postprocessing == choose(pairs, plan.dataset.labels, plan.dataset.label_groups, [0, 1])
    assert sel.postprocessing_for == sel.winner and sel.cases == 8 and sel.folds == 2
    # the table: every candidate with its Dice per class, the winner starred
    assert "* 3d_fullres+3d_lowres" in out and "left_lung" in out and out.count("\n") >= 8
    assert f"{expected['3d_cascade_fullres'][0]:.4f}" in out


def test_names_fall_back_to_plan_names_where_two_plans_share_a_configuration(hand_made, tmp_path):
    other = _variant(hand_made["full"], "other", "3d_fullres")
    _fake_cv(other, 0.7, seed=7)
    rc, _, err = _cli(["select", hand_made["full"], other, "-o", tmp_path / "s.yaml"])
    assert rc == 0, err
    assert {c.name for c in load_selection(tmp_path / "s.yaml").ranking} == {"full", "other", "full+other"}


def _refused(args, *needles) -> str:
    rc, _, err = _cli(args)
    assert rc == 2 and err.startswith("segplan: error: "), err
    for n in needles:
        assert str(n) in err, (n, err)
    return err


def test_select_refuses_unfinished_folds_other_splits_and_other_labels_by_name(hand_made, tmp_path):
    out = tmp_path / "s.yaml"
    # a fold that has not finished: the plan, the fold and the command that finishes it
    unfinished = _variant(hand_made["full"], "unfinished", "3d_fullres")
    _fake_cv(unfinished, 0.5, seed=3)
    Workspace(unfinished).fold(1).finished.unlink()
    _refused(["select", hand_made["full"], unfinished, "-o", out], unfinished, "fold 1 has not finished training",
             f"segplan run {unfinished} --fold 1")
    # a fold validated without probabilities (before segplan saved them): the same command redoes them
    ws = Workspace(unfinished)
    ws.fold(1).finished.write_text("{}")
    gone = ws.splits()[0]["val"][1]
    ws.fold(0).validation_probabilities(gone).unlink()
    _refused(["select", unfinished, hand_made["low"], "-o", out], "fold 0 has no out-of-fold probabilities",
             gone, f"segplan run {unfinished} --fold 0")
    # another split: both plans and the first fold that differs
    plan = load_plan(hand_made["low"])
    mixed = _variant(hand_made["low"], "mixed", "3d_lowres",
                     cross_validation=dataclasses.replace(plan.cross_validation, seed=plan.cross_validation.seed + 1))
    _fake_cv(mixed, 0.5, seed=4)
    assert Workspace(mixed).splits()[0] != Workspace(hand_made["full"]).splits()[0]
    _refused(["select", hand_made["full"], mixed, "-o", out], hand_made["full"], mixed,
             "have different cross-validation splits: fold 0 validates")
    # other labels
    relabelled = _variant(hand_made["low"], "relabelled", "3d_lowres", dataset=dataclasses.replace(
        plan.dataset, work_dir="work/relabelled",
        labels={("lesion" if k == "infection" else k): v for k, v in plan.dataset.labels.items()}))
    _refused(["select", hand_made["full"], relabelled, "-o", out], relabelled, "segment other labels")
    _refused(["select", hand_made["full"], hand_made["full"], "-o", out], "is given twice")
    assert not out.exists()


def test_select_makes_the_folder_of_its_output(hand_made, tmp_path):
    """`select -o DIR/FILE` with a folder that does not exist once failed after all the scoring,
    naming a temporary file."""
    out = tmp_path / "new" / "deeper" / "selection.yaml"
    rc, _, err = _cli(["select", hand_made["full"], hand_made["low"], "-o", out])
    assert rc == 0, err
    assert "winner:" in out.read_text()


def test_the_selection_file_is_checked_by_key_when_loaded(hand_made, tmp_path):
    path = tmp_path / "s.yaml"
    assert _cli(["select", hand_made["full"], hand_made["low"], "-o", path])[0] == 0
    good = yaml.safe_load(path.read_text())
    assert path.read_text().startswith("# segplan selection")   # commented for the reader

    def problems(edit) -> str:
        data = yaml.safe_load(path.read_text())
        edit(data)
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump(data, sort_keys=False))
        with pytest.raises(SelectionError) as e:
            load_selection(bad)
        assert str(bad) in str(e.value)
        return str(e.value)

    assert "winner: 'best' is not a name in ranking" in problems(lambda d: d.update(winner="best"))
    assert "ranking.0.dice.left_lung: 1.5 is not a Dice" in problems(
        lambda d: d["ranking"][0]["dice"].update(left_lung=1.5))
    assert "ranking.0.plans.0: plan file" in problems(lambda d: d["ranking"][0].update(plans=["nowhere.yaml"]))
    assert "selection_version: version 9 is unknown" in problems(lambda d: d.update(selection_version=9))
    assert "ranking.1.plans: 3 plans" in problems(lambda d: d["ranking"][1].update(plans=["a", "b", "c"]))
    assert "postprocessing.rules.0.labels: [9]" in problems(lambda d: d["postprocessing"].update(
        rules=[{"keep_largest": "x", "labels": [9]}]))
    assert "winner: missing" in problems(lambda d: d.pop("winner"))
    assert "unknown key; did you mean 'winner'" in problems(lambda d: d.update(winer="x"))
    # another winner: the postprocessing decided for the first is refused for it, unless emptied
    other = good["ranking"][1]["name"]

    def pick(d, rules):
        d.update(winner=other)
        d["postprocessing"]["rules"] = rules
    assert "postprocessing_for: the postprocessing was decided for" in problems(
        lambda d: pick(d, [{"keep_largest": "left_lung", "labels": [1]}]))
    data = dict(good, winner=other)
    data["postprocessing"] = dict(good["postprocessing"], rules=[])
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    assert load_selection(path).winner == other
