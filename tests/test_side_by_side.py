"""benchmarks/side_by_side.py's own logic, without nnU-Net, torch or a training: the epoch count that
keeps nnU-Net's training within the budget, the subset's split, the shared inputs, and that the
script imports neither nnU-Net nor torch (nor segplan's runner) until it runs them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.side_by_side import (fit_epochs, fold_split, format_table, nnunet_dataset_name, nnunet_env,
                                     prepare_inputs, subset_splits)
from segplan.runner.splits import validate_splits

ROOT = Path(__file__).resolve().parents[1]


def simulate(budget_s: float, setup_s: float, first_s: float, later_s: float, reserve_s: float,
             max_epochs: int | None = None) -> tuple[int, float]:
    """The trainer's loop: the count is refitted after every epoch from the times so far; returns
    (epochs run, seconds when the last ended)."""
    elapsed, times, num_epochs = setup_s, [], max_epochs or 1000
    while len(times) < num_epochs:
        t = first_s if not times else later_s
        elapsed += t
        times.append(t)
        num_epochs = fit_epochs(budget_s, elapsed, times, reserve_s, max_epochs)
    return len(times), elapsed


def test_fit_epochs_counts_what_fits_after_the_warm_up():
    # 30 s of 300 gone in one 20-s epoch (plus 10 s of setup): 270 - 5 reserved = 265 s at 20 s each
    assert fit_epochs(300, 30, [20], reserve_s=5) == 1 + 13
    # the first epoch (compilation) is left out once a second is known: 10-s epochs from then on
    assert fit_epochs(300, 80, [60, 10], reserve_s=5) == 2 + 21
    # the slowest epoch since the first sets the pace, so the last one cannot overrun
    assert fit_epochs(300, 80, [60, 10, 12], reserve_s=5) == 3 + 17
    # never fewer than done, never more than the cap
    assert fit_epochs(100, 150, [150]) == 1
    assert fit_epochs(300, 30, [20], max_epochs=5) == 5
    with pytest.raises(ValueError):
        fit_epochs(300, 0, [])


@settings(max_examples=300, deadline=None)
@given(setup=st.floats(0, 30), first=st.floats(0.5, 120), ratio=st.floats(0.05, 1.0), reserve=st.floats(0, 5),
       slack=st.floats(-5, 300), cap=st.none() | st.integers(1, 50))
def test_training_ends_within_the_budget_and_uses_it(setup, first, ratio, reserve, slack, cap):
    """Epochs after the first as long as or shorter than it: the loop ends within the budget
    (unless the first epoch alone overran it), and one more epoch would not have fitted (unless
    the cap stopped it). The budget: setup, first epoch and reserve, then ``slack`` later epochs'
    worth of time (negative: not even the first epoch fits)."""
    later = first * ratio
    budget = setup + first + reserve + slack * later
    epochs, end = simulate(budget, setup, first, later, reserve, cap)
    if epochs > 1:
        assert end + reserve <= budget + 1e-6
    if cap is None or epochs < cap:
        assert end + (later if epochs > 1 else first) + reserve > budget - 1e-6


def test_the_first_epoch_alone_may_overrun_only_itself():
    # a budget smaller than one epoch: exactly one epoch, as nnU-Net cannot stop inside one
    assert simulate(10, 1, 30, 30, 0) == (1, 31)


def test_subset_split_partitions_the_subset_and_keeps_fold_0():
    split = {"train": [f"t{i:02d}" for i in range(20)], "val": [f"v{i}" for i in range(6)]}
    splits = subset_splits(split, 8, 3)
    assert splits[0] == {"train": sorted(split["train"][:8]), "val": ["v0", "v1", "v2"]}
    cases = split["train"][:8] + split["val"][:3]
    validate_splits(splits, cases, "subset", folds=5)  # segplan's own check of a given split
    for s in splits:
        assert sorted(s["train"] + s["val"]) == sorted(cases)
    with pytest.raises(ValueError, match="training cases"):
        subset_splits(split, 3, 2)
    with pytest.raises(ValueError, match="asked for 8 and 7"):
        subset_splits(split, 8, 7)


def test_hippocampus_fold_0_and_a_subset_of_it(hippocampus):
    splits = json.loads((hippocampus / "splits_final.json").read_text())
    fold0 = fold_split(splits, 0)
    assert (len(fold0["train"]), len(fold0["val"])) == (208, 52)
    sub = subset_splits(fold0, 8, 4)
    validate_splits(sub, fold0["train"][:8] + fold0["val"][:4], "subset", folds=5)
    with pytest.raises(ValueError, match="folds 0..4"):
        fold_split(splits, 5)
    with pytest.raises(ValueError, match="both train and val"):
        fold_split([{"train": ["a", "b"], "val": ["b"]}], 0)


def fake_dataset(root: Path, n: int = 10) -> Path:
    data = root / "Dataset004_Hippocampus"
    ids = [f"hippocampus_{i:03d}" for i in range(n)]
    for folder, suffix in (("imagesTr", "_0000.nii.gz"), ("labelsTr", ".nii.gz")):
        (data / folder).mkdir(parents=True)
        for cid in ids:
            (data / folder / f"{cid}{suffix}").write_text(cid)
    (data / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1}, "numTraining": n,
                                                   "file_ending": ".nii.gz", "channel_names": {"0": "MRI"}}))
    splits = [{"train": ids[2:], "val": ids[:2]}] + [{"train": ids[:2], "val": ids[2:]}]
    (data / "splits_final.json").write_text(json.dumps(splits))
    return data


def test_prepare_inputs_links_a_subset_its_validation_images_and_references(tmp_path):
    data = fake_dataset(tmp_path / "raw")
    sub, split = prepare_inputs(data, tmp_path / "work", [4, 1])
    assert sub == tmp_path / "work" / "data" / "Dataset004_Hippocampus" and split["val"] == ["hippocampus_000"]
    meta = json.loads((sub / "dataset.json").read_text())
    assert meta["numTraining"] == 5 and meta["labels"] == {"background": 0, "a": 1}
    assert sorted(p.name for p in (sub / "imagesTr").iterdir()) == [f"hippocampus_{i:03d}_0000.nii.gz" for i in [0, 2, 3, 4, 5]]
    assert json.loads((sub / "splits_final.json").read_text())[0] == split
    assert [p.name for p in (tmp_path / "work" / "validation_images").iterdir()] == ["hippocampus_000_0000.nii.gz"]
    ref = tmp_path / "work" / "reference" / "hippocampus_000.nii.gz"
    assert ref.resolve() == (data / "labelsTr" / "hippocampus_000.nii.gz").resolve()
    # the whole dataset: used as it is, fold 0 of its own split
    same, split = prepare_inputs(data, tmp_path / "work", None)
    assert same == data and len(split["train"]) == 8
    assert sorted(p.name for p in (tmp_path / "work" / "reference").iterdir()) == ["hippocampus_000.nii.gz",
                                                                                  "hippocampus_001.nii.gz"]


def test_nnunet_names_and_environment(tmp_path):
    assert nnunet_dataset_name("Dataset004_Hippocampus") == (4, "Dataset004_Hippocampus")
    assert nnunet_dataset_name("my-data set") == (999, "Dataset999_mydataset")
    base = {"PATH": "/bin"}
    env = nnunet_env(base, tmp_path, compile_=False)
    assert base == {"PATH": "/bin"}  # the caller's environment is not touched
    assert env["nnUNet_preprocessed"] == str(tmp_path / "nnUNet_preprocessed") and env["nnUNet_compile"] == "f"
    assert "nnUNet_compile" not in nnunet_env(base, tmp_path, compile_=None)


def test_table_has_a_row_per_tool():
    row = {"dice": {"anterior": 0.9, "posterior": 0.88}, "prepare_seconds": 1.0, "train_seconds": 300.0,
           "predict_seconds": 20.0, "epochs": 30, "iterations": 7500}
    text = format_table({"minutes": 5, "device": "cuda", "train_cases": 208, "validation_cases": 52,
                         "segplan": row, "nnunet": row | {"dice": {"anterior": 0.85, "posterior": 0.8}}})
    assert "0.9000" in text.splitlines()[2] and text.splitlines()[3].split()[:4] == ["nnU-Net", "v2", "0.8500", "0.8000"]
    alone = format_table({"minutes": 5, "device": "cuda", "train_cases": 208, "validation_cases": 52, "nnunet": row})
    assert len(alone.splitlines()) == 3 and alone.splitlines()[2].startswith("nnU-Net v2")


def test_the_script_imports_no_nnunet_torch_or_runner():
    code = ("import sys, benchmarks.side_by_side; "
            "print(sorted(m for m in ('torch', 'nnunetv2', 'runner', 'planner', 'keras') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.stdout.strip() == "[]"
