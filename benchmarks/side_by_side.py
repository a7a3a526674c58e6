"""nnU-Net v2 against segplan on the same machine, fold and wall-clock training budget (issue 23).

    KERAS_BACKEND=torch python benchmarks/side_by_side.py --minutes 5 --device cuda --data DIR [--out FILE]
    python benchmarks/side_by_side.py --device cpu --nnunet-python /work/nnunet_venv/bin/python \\
        --minutes 0.5 --iterations 4 --epochs 2 --subset 8 4          (the logic check on a CPU, minutes)

Fold 0 of the dataset's nnU-Net ``splits_final.json`` (Hippocampus: 208 training, 52 validation
cases), each tool with its own plan and trainer, one after the other:

1. segplan: the GPU plan for the card (``plan_dataset(device="gpu", gpu_memory=...)``, as
   hippocampus_budget.py --device gpu), ``training.schedule.time_budget_minutes`` = the budget;
   preprocessing, fold 0's training and ``predict_folder`` on the validation images, each timed.
2. nnU-Net v2, in a subprocess run by ``--nnunet-python`` (default: this python) on this same file
   (``--nnunet-worker SPEC``), with nnUNet_raw / nnUNet_preprocessed / nnUNet_results pointing into
   ``--work`` in that process's environment only (segplan never reads environment variables, and
   never imports nnunetv2 or torch: both are imported inside the worker's functions only): its
   fingerprint, ExperimentPlanner (``--gpu-memory`` as its target) and 3d_fullres preprocessing,
   the dataset's ``splits_final.json`` copied beside its plans so fold 0 is the same split; then its
   own nnUNetTrainer, subclassed here only to end within the budget (``fit_epochs``: after every
   epoch the epoch count is refitted from the slowest epoch since the first and the time left, and
   the poly learning rate's ``max_steps`` follows it, so the rate decays to the budget's end), and
   nnUNetPredictor (its defaults: half-overlapping tiles, Gaussian weighting, mirroring) on the
   validation images, timed. nnU-Net's budget is the budget, or segplan's measured training wall
   time where that was longer (segplan's budget counts its training steps, not its validation), so
   both train for the same wall-clock time. nnU-Net's torch.compile follows its own default (on for
   CUDA) unless ``--no-compile``.
3. One evaluator, segplan's ``segplan.runner.evaluation.evaluate.evaluate_folder``, scores both prediction folders
   against the same reference labels: mean Dice per class over the validation cases.

Prints a table and one JSON line (``--out FILE`` writes it too). ``--iterations N`` (iterations per
epoch of both; nnU-Net's validation iterations N/5) and ``--epochs E`` (a cap on both) make the
logic check short; ``--subset TRAIN VAL`` links the first TRAIN training and VAL validation cases of
fold 0 into a smaller dataset under --work with a split of its own (``subset_splits``). ``--tools``
runs one tool only, for a call too short for both (nnU-Net's budget is then ``--minutes``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FOLD = 0
NNUNET_CONFIGURATION = "3d_fullres"


# --- pure logic (no segplan, nnU-Net or torch import; tests/test_side_by_side.py) -----------------

def fit_epochs(budget_s: float, elapsed_s: float, epoch_seconds: list[float], reserve_s: float = 0.0,
               max_epochs: int | None = None) -> int:
    """How many epochs in all a training that has run ``elapsed_s`` seconds (its ``epoch_seconds``
    so far, at least one) can have and still end within ``budget_s``, ``reserve_s`` kept for what
    follows the last epoch (the final checkpoint). The next epochs are taken to last as long as the
    slowest since the first (the first carries the warm-up: compilation, the loaders' start), or as
    the first while it is the only one: an over- rather than under-estimate, so the training ends
    within the budget. Never fewer than the epochs done, never more than ``max_epochs``."""
    if not epoch_seconds:
        raise ValueError("fit_epochs needs the time of at least one finished epoch")
    done = len(epoch_seconds)
    per_epoch = max(epoch_seconds[1:]) if done > 1 else epoch_seconds[0]
    left = budget_s - reserve_s - elapsed_s
    more = max(0, math.floor(left / per_epoch)) if per_epoch > 0 else 0
    total = done + more
    return min(total, max_epochs) if max_epochs is not None else total


def fold_split(splits: list[dict], fold: int, source: str = "splits_final.json") -> dict[str, list[str]]:
    """Fold ``fold`` of an nnU-Net split list ({train, val} per fold), checked: no case in both."""
    if not 0 <= fold < len(splits):
        raise ValueError(f"{source}: fold {fold} asked, the file has folds 0..{len(splits) - 1}")
    s = splits[fold]
    both = set(s["train"]) & set(s["val"])
    if both:
        raise ValueError(f"{source}: fold {fold}: {sorted(both)[:5]} are in both train and val")
    return {"train": list(s["train"]), "val": list(s["val"])}


def subset_splits(split: dict[str, list[str]], n_train: int, n_val: int, folds: int = 5) -> list[dict]:
    """A ``folds``-fold split of a subset: fold 0 validates the first ``n_val`` validation cases of
    ``split`` and trains on its first ``n_train`` training cases; folds 1.. deal those training
    cases out as their validation sets, so that every case is validated exactly once (segplan checks
    that a given split partitions the dataset, and its plan has min(5, cases) folds)."""
    if n_val < 1 or n_train < folds - 1:
        raise ValueError(f"a subset needs >= 1 validation case and >= {folds - 1} training cases (one per "
                         f"other fold); asked for {n_train} training, {n_val} validation")
    if n_train > len(split["train"]) or n_val > len(split["val"]):
        raise ValueError(f"the split has {len(split['train'])} training and {len(split['val'])} validation "
                         f"cases; asked for {n_train} and {n_val}")
    train, val = list(split["train"][:n_train]), list(split["val"][:n_val])
    out = [{"train": sorted(train), "val": sorted(val)}]
    for k in range(1, folds):
        v = sorted(train[k - 1::folds - 1])
        out.append({"train": sorted(set(train + val) - set(v)), "val": v})
    return out


def nnunet_dataset_name(folder: str) -> tuple[int, str]:
    """(dataset id, DatasetXXX_Name) under which nnU-Net finds the dataset folder: its own name when
    it follows nnU-Net's pattern, else Dataset999_ and the name's letters and digits."""
    m = re.fullmatch(r"Dataset(\d{3})_(\w+)", folder)
    if m:
        return int(m.group(1)), folder
    return 999, "Dataset999_" + (re.sub(r"\W", "", folder) or "SideBySide")


def nnunet_env(base: dict, work: Path, compile_: bool | None) -> dict:
    """The nnU-Net subprocess's environment: ``base`` plus its three folders under ``work`` (and
    nnUNet_compile off when asked); the caller's own environment is not changed."""
    env = dict(base) | {"nnUNet_raw": str(work / "nnUNet_raw"), "nnUNet_preprocessed": str(work / "nnUNet_preprocessed"),
                        "nnUNet_results": str(work / "nnUNet_results"), "PYTHONUNBUFFERED": "1"}
    if compile_ is False:
        env["nnUNet_compile"] = "f"
    return env


def format_table(result: dict) -> str:
    """The side-by-side table: one row per tool, Dice per class then seconds and steps."""
    tools = [(key, name) for key, name in (("segplan", "segplan"), ("nnunet", "nnU-Net v2")) if key in result]
    classes = list(result[tools[0][0]]["dice"])
    head = f"{'':<12}" + "".join(f"{c:>11}" for c in classes) + "".join(
        f"{h:>11}" for h in ("prep s", "train s", "predict s", "epochs", "iterations"))
    lines = [f"fold {FOLD}: {result['train_cases']} training, {result['validation_cases']} validation cases; "
             f"budget {result['minutes']:g} min each on {result['device']}", head]
    for key, name in tools:
        r = result[key]
        lines.append(f"{name:<12}" + "".join(f"{r['dice'][c]:>11.4f}" for c in classes)
                     + f"{r['prepare_seconds']:>11.1f}{r['train_seconds']:>11.1f}{r['predict_seconds']:>11.1f}"
                     + f"{r['epochs']:>11}{r['iterations']:>11}")
    return "\n".join(lines)


# --- the shared inputs: dataset (or subset), validation images, references -----------------------

def prepare_inputs(data: Path, work: Path, subset: list[int] | None) -> tuple[Path, dict]:
    """The dataset both tools read (``data`` itself, or a linked subset under ``work``), and fold 0
    of its split; links its validation images into work/validation_images (nnU-Net's _0000 names)
    and their labels into work/reference."""
    split = fold_split(json.loads((data / "splits_final.json").read_text()), FOLD, str(data / "splits_final.json"))
    if subset:
        splits = subset_splits(split, subset[0], subset[1])
        sub = work / "data" / data.name
        if sub.exists():
            shutil.rmtree(sub)
        cases = splits[0]["train"] + splits[0]["val"]
        for folder, suffix in (("imagesTr", "_0000.nii.gz"), ("labelsTr", ".nii.gz")):
            (sub / folder).mkdir(parents=True)
            for cid in cases:
                (sub / folder / f"{cid}{suffix}").symlink_to((data / folder / f"{cid}{suffix}").resolve())
        meta = json.loads((data / "dataset.json").read_text()) | {"numTraining": len(cases)}
        (sub / "dataset.json").write_text(json.dumps(meta, indent=1))
        (sub / "splits_final.json").write_text(json.dumps(splits, indent=1))
        data, split = sub, splits[0]
    for name, folder, suffix in (("validation_images", "imagesTr", "_0000.nii.gz"), ("reference", "labelsTr", ".nii.gz")):
        out = work / name
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        for cid in split["val"]:
            (out / f"{cid}{suffix}").symlink_to((data / folder / f"{cid}{suffix}").resolve())
    return data, split


# --- segplan ------------------------------------------------------------------------------------

def run_segplan(data: Path, work: Path, a) -> dict:
    """segplan's GPU plan for the card, fold 0 under the budget, its prediction of the validation
    images; seconds of each step, epochs and iterations."""
    import csv
    import dataclasses
    from segplan.planner.plan_file import load_plan, save_plan
    from segplan.planner.planning import plan_dataset
    from segplan.runner.inference.predict import predict_folder
    from segplan.runner.preprocessing.preprocess import preprocess_dataset
    from segplan.runner.training.train import train_fold
    from segplan.runner.workspace import Workspace
    shutil.rmtree(work / "segplan", ignore_errors=True)  # from scratch, as nnU-Net's side is
    plan_path = work / "segplan" / "plan.yaml"
    t = time.perf_counter()
    plan_dataset(data, plan_path, device="gpu", gpu_memory=a.gpu_memory, force=True, progress=False, workers=a.workers)
    plan = load_plan(plan_path)
    sched = dataclasses.replace(plan.training.schedule, time_budget_minutes=a.minutes)
    if a.iterations:
        sched = dataclasses.replace(sched, iterations_per_epoch=a.iterations)
    if a.epochs:
        sched = dataclasses.replace(sched, max_epochs=a.epochs)
    # a logic check on a CPU: float32, as a CPU plan would (bfloat16 emulation only slows it down there)
    training = dataclasses.replace(plan.training, schedule=sched,
                                   mixed_precision=plan.training.mixed_precision and a.device == "cuda")
    save_plan(plan.replace(training=training), plan_path)
    ws = Workspace(plan_path)
    preprocess_dataset(ws, workers=a.workers, progress=False)
    prepare_s = time.perf_counter() - t
    t = time.perf_counter()
    fold = train_fold(ws, FOLD, restart=True, workers=a.workers, progress=False)
    train_s = time.perf_counter() - t
    out = work / "segplan" / "validation_predictions"
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    predict_folder(plan_path, work / "validation_images", out, folds=[FOLD], progress=False)
    predict_s = time.perf_counter() - t
    with open(fold.history) as f:
        epochs = len(list(csv.DictReader(f)))
    tr = ws.plan.training
    return {"prepare_seconds": round(prepare_s, 1), "train_seconds": round(train_s, 1),
            "predict_seconds": round(predict_s, 1), "epochs": epochs,
            "iterations": epochs * tr.schedule.iterations_per_epoch,  # at most: the budget may cut the last epoch
            "patch": list(tr.patch_size), "batch": tr.batch_size, "filters": list(ws.plan.network.filters),
            "finished": json.loads(fold.finished.read_text()), "predictions": str(out)}


# --- nnU-Net v2 (the worker runs in its own process, with its own python) ----------------------

def run_nnunet(data: Path, work: Path, a, budget_s: float) -> dict:
    """nnU-Net v2 in a subprocess (``--nnunet-python``): plan, preprocess, train under ``budget_s``,
    predict the validation images. Its output goes to work/nnunet/log.txt."""
    dataset_id, name = nnunet_dataset_name(data.name)
    base = work / "nnunet"
    shutil.rmtree(base, ignore_errors=True)
    (base / "nnUNet_raw").mkdir(parents=True)
    (base / "nnUNet_raw" / name).symlink_to(data.resolve())
    spec = {"dataset_id": dataset_id, "dataset_name": name, "splits": str(data / "splits_final.json"),
            "device": a.device, "gpu_memory": a.gpu_memory, "budget_s": budget_s, "iterations": a.iterations,
            "epochs": a.epochs, "workers": a.workers, "images": str(work / "validation_images"),
            "out": str(base / "validation_predictions"), "result": str(base / "result.json")}
    (base / "spec.json").write_text(json.dumps(spec, indent=1))
    log = base / "log.txt"
    env = nnunet_env(os.environ, base, False if a.no_compile else None)
    with open(log, "w") as f:
        rc = subprocess.call([a.nnunet_python, str(Path(__file__).resolve()), "--nnunet-worker", str(base / "spec.json")],
                             env=env, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise RuntimeError(f"the nnU-Net worker ({a.nnunet_python}) exited with {rc}; the end of {log}:\n{tail}")
    return json.loads((base / "result.json").read_text()) | {"predictions": spec["out"]}


def nnunet_worker(spec_path: Path) -> None:
    """In the nnU-Net process: fingerprint, plan, preprocess 3d_fullres, train fold 0 under the
    budget, predict the validation images; writes the seconds and counts to spec['result']."""
    import torch
    import nnunetv2
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset, plan_experiment_dataset
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    spec = json.loads(Path(spec_path).read_text())
    device = torch.device(spec["device"])
    pre = Path(nnUNet_preprocessed) / spec["dataset_name"]
    t = time.perf_counter()
    extract_fingerprint_dataset(spec["dataset_id"], DatasetFingerprintExtractor, spec["workers"], False, True, False, False)
    _, plans_id = plan_experiment_dataset(spec["dataset_id"], ExperimentPlanner, gpu_memory_target_in_gb=spec["gpu_memory"])
    # nnUNetv2_preprocess -c 3d_fullres, without its copy of the references (not needed here)
    plans = load_json(str(pre / f"{plans_id}.json"))
    cm = PlansManager(plans).get_configuration(NNUNET_CONFIGURATION)
    cm.preprocessor_class(verbose=False).run(spec["dataset_id"], NNUNET_CONFIGURATION, plans_id, num_processes=spec["workers"])
    shutil.copy(spec["splits"], pre / "splits_final.json")  # fold 0 is the same split
    prepare_s = time.perf_counter() - t

    trainer = budget_trainer_class()(plans=plans | {"continue_training": False}, configuration=NNUNET_CONFIGURATION,
                                     fold=FOLD, dataset_json=load_json(str(pre / "dataset.json")), device=device)
    trainer.set_budget(spec["budget_s"], spec["iterations"], spec["epochs"])
    t = time.perf_counter()
    trainer.run_training()
    train_s = time.perf_counter() - t

    t = time.perf_counter()
    predict_with_nnunet(trainer, Path(spec["images"]), Path(spec["out"]), device, spec["workers"])
    predict_s = time.perf_counter() - t
    result = {"prepare_seconds": round(prepare_s, 1), "train_seconds": round(train_s, 1),
              "predict_seconds": round(predict_s, 1), "epochs": trainer.current_epoch,
              "iterations": trainer.current_epoch * trainer.num_iterations_per_epoch,
              "budget_seconds": round(spec["budget_s"], 1), "epoch_seconds": [round(s, 2) for s in trainer.epoch_seconds],
              "patch": list(cm.patch_size), "batch": cm.batch_size, "filters": list(
                  cm.network_arch_init_kwargs.get("features_per_stage", [])),
              "nnunetv2": getattr(nnunetv2, "__version__", None) or _version("nnunetv2"), "torch": torch.__version__}
    Path(spec["result"]).write_text(json.dumps(result))


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def budget_trainer_class():
    """nnUNetTrainer, changed only in how many epochs it runs: after every epoch ``fit_epochs``
    sets ``num_epochs`` (and the poly schedule's ``max_steps``) so the training ends within the
    budget, counted from the start of run_training (its loaders' start and torch.compile included).
    Its run_training is nnU-Net's loop, with a ``while`` over the live ``num_epochs`` instead of a
    ``range`` fixed at the start. Defined here and instantiated directly: no trainer registry."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class SideBySideTrainer(nnUNetTrainer):
        def set_budget(self, budget_s: float, iterations: int | None, max_epochs: int | None) -> None:
            self.budget_s, self.max_epochs, self.epoch_seconds = budget_s, max_epochs, []
            if iterations:
                self.num_iterations_per_epoch = iterations
                self.num_val_iterations_per_epoch = max(1, iterations // 5)  # nnU-Net's 250 : 50
            self.num_epochs = max_epochs or self.num_epochs  # the first epoch's schedule; refitted after it

        def on_epoch_start(self):
            self._epoch_t0 = time.perf_counter()
            super().on_epoch_start()

        def on_epoch_end(self):
            super().on_epoch_end()  # logs, checkpoints, current_epoch += 1
            now = time.perf_counter()
            self.epoch_seconds.append(now - self._epoch_t0)
            self.num_epochs = fit_epochs(self.budget_s, now - self._budget_t0, self.epoch_seconds,
                                         reserve_s=2.0, max_epochs=self.max_epochs)
            self.lr_scheduler.max_steps = self.num_epochs
            self.print_to_log_file(f"side-by-side: {now - self._budget_t0:.1f} s of {self.budget_s:.0f}, "
                                   f"num_epochs now {self.num_epochs}")

        def run_training(self):
            self._budget_t0 = time.perf_counter()
            self.on_train_start()
            while self.current_epoch < self.num_epochs:
                self.on_epoch_start()
                self.on_train_epoch_start()
                train_outputs = [self.train_step(next(self.dataloader_train)) for _ in range(self.num_iterations_per_epoch)]
                self.on_train_epoch_end(train_outputs)
                with torch.no_grad():
                    self.on_validation_epoch_start()
                    val_outputs = [self.validation_step(next(self.dataloader_val))
                                   for _ in range(self.num_val_iterations_per_epoch)]
                    self.on_validation_epoch_end(val_outputs)
                self.on_epoch_end()
            self.on_train_end()

    return SideBySideTrainer


def predict_with_nnunet(trainer, images: Path, out: Path, device, workers: int) -> None:
    """nnUNetPredictor with its defaults on ``images``, from the final checkpoint the trainer wrote;
    the network built as nnU-Net's own trainer builds it (manual_initialization: no class lookup)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    ckpt = torch.load(Path(trainer.output_folder) / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    pm, cm, ds = trainer.plans_manager, trainer.configuration_manager, trainer.dataset_json
    net = nnUNetTrainer.build_network_architecture(pm, cm, determine_num_input_channels(pm, cm, ds),
                                                   pm.get_label_manager(ds).num_segmentation_heads,
                                                   enable_deep_supervision=False)
    net.load_state_dict(ckpt["network_weights"])
    predictor = nnUNetPredictor(device=device, verbose=False, allow_tqdm=False)
    predictor.manual_initialization(net, pm, cm, [ckpt["network_weights"]], ds, trainer.__class__.__name__,
                                    ckpt.get("inference_allowed_mirroring_axes"))
    predictor.predict_from_files(str(images), str(out), save_probabilities=False, overwrite=True,
                                 num_processes_preprocessing=workers, num_processes_segmentation_export=workers)


# --- scoring and the run ------------------------------------------------------------------------

def score(pred: Path, reference: Path, labels: dict[str, int]) -> dict[str, float]:
    """Mean Dice per foreground class over the reference cases (segplan's evaluator, for both)."""
    import yaml
    from segplan.planner.labels import LabelModel
    from segplan.runner.evaluation.evaluate import evaluate_folder
    evaluate_folder(pred, reference, lm=LabelModel(labels))
    summary = yaml.safe_load((pred / "summary.yaml").read_text())
    if summary["missing_predictions"]:
        raise RuntimeError(f"{pred}: no prediction for {summary['missing_predictions'][:5]}")
    return {c: round(summary["classes"][c]["dice"]["mean"], 4) for c in labels if labels[c] != 0}


def main() -> None:
    from benchmarks.common import HIPPOCAMPUS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=5.0, help="training budget of each tool")
    ap.add_argument("--data", type=Path, default=HIPPOCAMPUS, help="an nnU-Net raw dataset with splits_final.json")
    ap.add_argument("--gpu-memory", type=float, default=8.0, help="both plans' GPU memory budget (GB)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/side_by_side"))
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: the logic check without a GPU")
    ap.add_argument("--nnunet-python", default=sys.executable, help="a python with nnunetv2 and torch")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="processes for pre/postprocessing")
    ap.add_argument("--iterations", type=int, default=None, help="iterations per epoch of both (quick check)")
    ap.add_argument("--epochs", type=int, default=None, help="at most this many epochs each (quick check)")
    ap.add_argument("--subset", type=int, nargs=2, metavar=("TRAIN", "VAL"), default=None,
                    help="only the first TRAIN training and VAL validation cases of fold 0 (quick check)")
    ap.add_argument("--no-compile", action="store_true", help="nnU-Net without torch.compile (nnUNet_compile=f)")
    ap.add_argument("--tools", nargs="+", choices=["segplan", "nnunet"], default=["segplan", "nnunet"],
                    help="run only these (e.g. one per call where a call's time is limited)")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    a = ap.parse_args()
    work = a.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    data, split = prepare_inputs(a.data.resolve(), work, a.subset)
    labels = json.loads((data / "dataset.json").read_text())["labels"]
    result = {"minutes": a.minutes, "device": a.device, "gpu_memory_gb": a.gpu_memory, "fold": FOLD,
              "train_cases": len(split["train"]), "validation_cases": len(split["val"]),
              "iterations_per_epoch_override": a.iterations, "epochs_cap": a.epochs, "subset": a.subset}
    budget_s = a.minutes * 60
    if "segplan" in a.tools:
        seg = result["segplan"] = run_segplan(data, work, a)
        print(f"segplan: trained {seg['train_seconds']} s, predicted {seg['predict_seconds']} s", flush=True)
        budget_s = max(budget_s, seg["train_seconds"])  # the same wall-clock time for nnU-Net
    if "nnunet" in a.tools:
        nn = result["nnunet"] = run_nnunet(data, work, a, budget_s)
        print(f"nnU-Net: trained {nn['train_seconds']} s (budget {budget_s:.0f} s), predicted "
              f"{nn['predict_seconds']} s", flush=True)
    for tool in a.tools:
        result[tool]["dice"] = score(Path(result[tool].pop("predictions")), work / "reference", labels)
    print(format_table(result))
    print(json.dumps(result))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--nnunet-worker":
        nnunet_worker(Path(sys.argv[2]))
    else:
        main()
