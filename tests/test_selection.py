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

from segplan.planner.labels import label_model
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
    labels = list(load_plan(plan_path).dataset.labels.values())
    rng = np.random.default_rng(seed)

    def blended(cid, ref):
        rand = rng.dirichlet(np.full(len(labels), 0.3), size=ref.shape)
        return (1 - noise) * _one_hot(np.searchsorted(labels, ref), len(labels)) + noise * np.moveaxis(rand, -1, 0)
    _write_oof(plan_path, blended)


def _dice(pred: np.ndarray, ref: np.ndarray, value: int) -> float:
    """nnU-Net's Dice of one class in one case: NaN where it is absent from both (left out of the mean)."""
    p, r = pred == value, ref == value
    return np.nan if not (p.any() or r.any()) else 2 * np.sum(p & r) / (np.sum(p) + np.sum(r))


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
    return {n: float(np.nanmean(v)) for n, v in dice.items()}, pairs


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
    assert sel.postprocessing == choose(pairs, label_model(plan), [0, 1])
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


def _write_oof(plan_path: Path, probabilities) -> None:
    """Every fold 'finished' with ``probabilities(case_id, reference) -> (outputs, z, y, x)`` as its
    float16 out-of-fold probabilities."""
    ws = Workspace(plan_path)
    files = {c.case_id: c.label_file for c in ws.dataset.cases}
    for k, split in enumerate(ws.splits()):
        fold = ws.fold(k)
        fold.validation.mkdir(parents=True)
        fold.pointer.write_text(json.dumps({"weights": "ckpt.weights.h5"}))
        fold.finished.write_text("{}")
        for cid in split["val"]:
            probs = probabilities(cid, read_label(files[cid])[0])
            np.savez_compressed(fold.validation_probabilities(cid), probabilities=probs.astype(np.float16))


def test_select_scores_only_annotated_voxels_and_keeps_the_perfect_plan(phantoms, tmp_path):
    """Issue 41: with every other slice unannotated (the ignore label), a plan whose out-of-fold
    predictions are the dense truth is perfect where anyone annotated, and must win with Dice 1
    over a plan that predicts anatomy only on the annotated slices and errs on some of them (before,
    the perfect plan's anatomy on unannotated slices counted as false positives: 0.65 against 0.9)."""
    from benchmarks.sparse_labels import sparse_copy
    sparse, ignore, _ = sparse_copy(phantoms, tmp_path / "sparse", every=2)
    base = tiny_plan(sparse, tmp_path / "plans" / "base.yaml", folds=2)
    assert load_plan(base).dataset.ignore_label == ignore
    dense = {p.name: p for p in (phantoms / "labelsTr").iterdir()}
    values = list(load_plan(base).dataset.labels.values())
    rng = np.random.default_rng(0)

    def perfect(cid, ref):
        truth = read_label(dense[f"{cid}.nii.gz"])[0]
        return _one_hot(np.searchsorted(values, truth), len(values))

    def annotated_only(cid, ref):
        guess = np.where(ref == ignore, 0, ref)
        guess[(guess > 0) & (rng.random(guess.shape) < 0.1)] = 0        # misses 10% of the annotated anatomy
        return _one_hot(np.searchsorted(values, guess), len(values))
    paths = {"full": _variant(base, "full", "3d_fullres"), "low": _variant(base, "low", "3d_lowres")}
    _write_oof(paths["full"], perfect)
    _write_oof(paths["low"], annotated_only)
    rc, out, err = _cli(["select", paths["low"], paths["full"], "-o", tmp_path / "sel.yaml"])
    assert rc == 0, err
    sel = load_selection(tmp_path / "sel.yaml")
    best = sel.ranking[0]
    assert sel.winner == best.name == "3d_fullres"
    assert best.mean_foreground_dice == 1.0 and set(best.dice.values()) == {1.0}
    low = next(c for c in sel.ranking if c.name == "3d_lowres")
    assert 0.5 < low.mean_foreground_dice < 0.99
    assert sel.postprocessing.rules == [] or all(r.keep_largest in sel.postprocessing.tried
                                                 for r in sel.postprocessing.rules)


REGIONS = {"lungs": [1, 2, 3], "right_lung": [2], "infection": [3]}


def test_select_takes_region_plans_and_scores_them_per_region(phantoms, tmp_path):
    """Issue 41: region plans (one sigmoid per region on disk) are read, averaged, thresholded in
    regions_class_order and scored per region, as Dice computed here in numpy says."""
    base = tiny_plan(phantoms, tmp_path / "plans" / "base.yaml", folds=2)
    plan = load_plan(base)
    ds = dataclasses.replace(plan.dataset, regions=REGIONS, regions_class_order=[1, 2, 3], label_groups={})
    paths = {name: _variant(base, name, conf, dataset=dataclasses.replace(ds, work_dir=f"work/{name}"))
             for name, conf in (("full", "3d_fullres"), ("low", "3d_lowres"))}
    for seed, (name, noise) in enumerate((("full", 0.3), ("low", 0.45))):
        rng = np.random.default_rng(seed)

        def regions(cid, ref, rng=rng, noise=noise):
            masks = np.stack([np.isin(ref, v) for v in REGIONS.values()]).astype(np.float32)
            return np.clip(masks + rng.normal(0, noise, masks.shape), 0, 1)
        _write_oof(paths[name], regions)
    rc, out, err = _cli(["select", paths["full"], paths["low"], "-o", tmp_path / "sel.yaml"])
    assert rc == 0, err
    sel = load_selection(tmp_path / "sel.yaml")
    assert sel.regions == REGIONS and set(sel.ranking[0].dice) == set(REGIONS)
    files = {c.case_id: c.label_file for c in Workspace(paths["full"]).dataset.cases}
    for cand in sel.ranking:
        wss = [Workspace(tmp_path / p) for p in cand.plans]
        dice = {n: [] for n in REGIONS}
        for k, split in enumerate(wss[0].splits()):
            for cid in split["val"]:
                ref = read_label(files[cid])[0]
                mean = sum(np.load(ws.fold(k).validation_probabilities(cid))["probabilities"].astype(np.float32)
                           for ws in wss) / len(wss)
                pred = np.zeros(ref.shape, np.uint8)
                for p, value in zip(mean, [1, 2, 3]):
                    pred[p > 0.5] = value
                for n, v in REGIONS.items():
                    a, b = np.isin(pred, v), np.isin(ref, v)
                    dice[n].append(np.nan if not (a.any() or b.any()) else 2 * np.sum(a & b) / (a.sum() + b.sum()))
        for n in REGIONS:
            assert cand.dice[n] == pytest.approx(np.nanmean(dice[n]), abs=1e-6)
        assert cand.mean_foreground_dice == pytest.approx(np.mean([np.nanmean(v) for v in dice.values()]), abs=1e-6)
    assert "lungs" in out and "right_lung" in out


def test_select_leaves_a_class_absent_from_prediction_and_reference_out_as_nnunet():
    """nnU-Net's compute_metrics: no Dice where a class is absent from both (segplan's evaluation
    counts 1 there); the mean is over the cases that have one, and a class with none is null."""
    from segplan.planner.labels import LabelModel
    from segplan.runner.evaluation.evaluate import case_metrics
    from segplan.runner.evaluation.selection import mean_dice, nnunet_dice
    lm = LabelModel({"background": 0, "a": 1, "b": 2})
    ref = np.zeros((4, 4, 4), np.uint8)
    ref[:2] = 1
    m = case_metrics(ref.copy(), ref, lm, (1.0, 1.0, 1.0))
    assert m["b"]["dice"] == 1.0 and np.isnan(nnunet_dice(m["b"])) and nnunet_dice(m["a"]) == 1.0
    stray = ref.copy()
    stray[3, 3, 3] = 2                     # predicted where the reference has none: Dice 0, not NaN
    assert nnunet_dice(case_metrics(stray, ref, lm, (1.0, 1.0, 1.0))["b"]) == 0.0
    assert mean_dice([1.0, np.nan, 0.5]) == 0.75 and mean_dice([np.nan, np.nan]) is None


def test_select_refuses_search_options_that_cannot_be_searched_before_writing_anything(hand_made, tmp_path):
    """--cases and --overlaps belong to --seconds-per-case; a time, sample or overlap that cannot be
    searched is refused by option before the output folder is made or any case is read."""
    plan = hand_made["full"]
    out = tmp_path / "new" / "selection.yaml"
    for args, says in [(["--cases", "20"], "give --seconds-per-case too"),
                       (["--overlaps", "0.25"], "give --seconds-per-case too"),
                       (["--seconds-per-case", "0"], "--seconds-per-case 0: a time in seconds above 0"),
                       (["--seconds-per-case", "5", "--cases", "0"], "--cases 0: a number of cases above 0"),
                       (["--seconds-per-case", "5", "--cases", "some"], "--cases some: a number of cases"),
                       (["--seconds-per-case", "5", "--overlaps", "0.5", "1.2"], "--overlaps 1.2: a window overlap")]:
        rc, _, err = _cli(["select", plan, *args, "-o", out])
        assert rc != 0 and says in err, (args, err)
    assert not out.parent.exists()
