"""The `segplan` command: one sub-command per step; TensorFlow is imported only by those that train or predict."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from runner.demo import DEMO_MINUTES

KERAS_COMMANDS = ("run", "predict", "demo")


def _fail(msg: str) -> int:
    print(f"segplan: error: {msg}", file=sys.stderr)
    return 2


def cmd_check_dataset(a) -> int:
    from planner.integrity import check_dataset, problems_to_json
    t = time.perf_counter()
    ds, problems = check_dataset(a.dataset, workers=a.workers, progress=a.bars and not a.json)
    errors = [p for p in problems if p.severity == "error"]
    if a.json:
        print(json.dumps({"dataset": str(a.dataset), "cases": len(ds.cases) if ds else 0, "ok": not errors,
                          "problems": problems_to_json(problems)}, indent=2))
    else:
        for p in problems:
            print(p)
        n = len(ds.cases) if ds else 0
        print(f"{n} cases checked in {time.perf_counter() - t:.1f} s: {len(errors)} errors, "
              f"{len(problems) - len(errors)} warnings")
    return 1 if errors else 0


def cmd_make_phantoms(a) -> int:
    from datasets.phantoms import make_phantoms
    out = make_phantoms(a.out, cases=a.cases, seed=a.seed, scale=a.scale, workers=a.workers, progress=a.bars)
    print(f"wrote {a.cases} phantoms to {out}")
    return 0


def cmd_import(a) -> int:
    from datasets import importers
    if (a.labels is not None) != (a.source == "dicom"):
        return _fail("import dicom DIR needs --labels LABELS_DIR, and only it takes --labels")
    if a.source == "dicom":
        from datasets.dicom_import import import_dicom
        if len(a.archives) != 1:
            return _fail(f"import dicom takes one folder of DICOM series, got {len(a.archives)}")
        import_dicom(a.archives[0], a.labels, a.out)
    elif a.source == "covid19-ct-seg":
        for name, url in importers.COVID_URLS.items():
            print(f"{name}: download from {url}")
        importers.import_covid19_ct_seg(a.archives[0], a.archives[1], a.out)
    else:
        print(f"MSD task archives: {importers.MSD_URL}")
        importers.import_msd(a.archives[0], a.out)
    print(f"wrote {a.out}; next: segplan check-dataset {a.out}")
    return 0


def cmd_plan(a) -> int:
    from planner.bundle_file import MAX_MEMBER_MB
    from planner.planning import plan_configurations, plan_dataset
    if a.max_member_mb is not None and a.from_bundle is None:
        return _fail("--max-member-mb limits what a bundle unpacks: it goes with --from")
    common = dict(gpu_memory=a.gpu_memory, preset=a.preset, workers=a.workers, force=a.force, device=a.device,
                  time_budget=a.time_budget, progress=a.bars, gpu_probe=a.probe)
    output = Path(a.output) if a.output else None
    if a.configurations:
        if a.from_bundle is not None:
            return _fail("--from keeps one trained network: plan one --configuration with it, not --configurations all")
        for c, path in plan_configurations(Path(a.dataset), output, **common).items():
            print(f"{c}: plan written to {path}; edit it, then: segplan check {path}")
        return 0
    path = plan_dataset(Path(a.dataset), output, **common, from_bundle=a.from_bundle, configuration=a.configuration,
                        max_member_mb=MAX_MEMBER_MB if a.max_member_mb is None else a.max_member_mb)
    print(f"plan written to {path}; edit it, then: segplan check {path}")
    return 0


def cmd_check(a) -> int:
    from planner.planning import check_plan_report
    print(check_plan_report(Path(a.plan)))
    return 0


def cmd_schema(a) -> int:
    from planner.plan_reference import markdown
    print(markdown(), end="")
    return 0


def cmd_preprocess(a) -> int:
    from runner.preprocess import preprocess_dataset
    from runner.workspace import Workspace
    out = preprocess_dataset(Workspace(Path(a.plan)), workers=a.workers, progress=a.bars)
    print(f"preprocessed cases in {out}")
    return 0


def cmd_run(a) -> int:
    from runner.pipeline import run_fold
    from runner.workspace import Workspace
    ws = Workspace(Path(a.plan))
    n = ws.plan.cross_validation.folds
    folds = range(n) if a.fold == "all" else [int(a.fold)]
    for k in folds:
        if not 0 <= k < n:
            return _fail(f"--fold {k}: the plan has folds 0..{n - 1}")
        run_fold(ws, k, resume=a.resume, restart=a.restart, workers=a.workers, progress=a.bars,
                 data_parallel=a.data_parallel)
    return 0


def cmd_predict(a) -> int:
    if sum(x is not None for x in (a.plan, a.model, a.selection)) != 1:
        return _fail("predict needs a plan (its work folder's folds), --model BUNDLE.zip or --selection FILE, "
                     "one of them")
    if a.folds is not None and len(set(a.folds)) != len(a.folds):
        return _fail(f"--folds {' '.join(map(str, a.folds))}: a fold given twice would count twice in the average")
    if a.model is None and a.max_member_mb is not None:
        return _fail("--max-member-mb limits what a bundle unpacks: it goes with --model")
    # every option applies to a plan and a bundle alike
    options = dict(folds=a.folds, tta=not a.no_tta, save_probabilities=a.save_probabilities, progress=a.bars,
                   postprocessing=not a.no_postprocessing, output_format=a.output_format)
    if a.model is not None:
        from planner.bundle_file import MAX_MEMBER_MB
        from runner.bundle import predict_with_bundle
        predict_with_bundle(Path(a.model), Path(a.input), Path(a.output), **options,
                            max_member_mb=MAX_MEMBER_MB if a.max_member_mb is None else a.max_member_mb)
        return 0
    if a.selection is not None:
        from runner.selection import predict_selection
        predict_selection(Path(a.selection), Path(a.input), Path(a.output), **options)
        return 0
    from runner.predict import predict_folder
    predict_folder(Path(a.plan), Path(a.input), Path(a.output), **options)
    return 0


def cmd_evaluate(a) -> int:
    from runner.evaluate import evaluate_folder
    summary = evaluate_folder(Path(a.pred), Path(a.ref), Path(a.plan) if a.plan else None, hd95=a.hd95,
                              nsd_tolerance=a.surface_dice)
    print(summary)
    return 0


def cmd_summarize(a) -> int:
    from runner.report import summarize
    from runner.workspace import Workspace
    print(summarize(Workspace(Path(a.plan))))
    return 0


def cmd_submit(a) -> int:
    from runner.cluster import Resources, submit
    folds = None if a.folds == ["all"] else [int(k) for k in a.folds]
    res = Resources(a.partition, a.gpus_per_job, a.cpus_per_job, a.mem, a.time)
    print("\n".join(submit(Path(a.plan), folds, a.executor, res, dry_run=a.dry_run, data_parallel=a.data_parallel)))
    return 0


def cmd_status(a) -> int:
    from runner.status import status
    print(status(Path(a.plan)))
    return 0


def cmd_export(a) -> int:
    if (a.plan is None) == (a.selection is None):
        return _fail("export needs a plan or --selection FILE, one of the two")
    if a.selection is not None:
        if a.format:
            return _fail("--format writes one plan's networks; a selection may be an ensemble: export a plan")
        from runner.bundle import export_selection
        print(f"wrote {export_selection(Path(a.selection), Path(a.output), a.folds)}; on another machine: "
              f"segplan predict --model {Path(a.output).name} -i IN -o OUT")
        return 0
    if a.format:
        from runner.bundle import export_network
        for path in export_network(Path(a.plan), Path(a.output), a.format, a.folds):
            print(f"wrote {path}")
        return 0
    from runner.bundle import export
    print(f"wrote {export(Path(a.plan), Path(a.output), a.folds)}; on another machine: "
          f"segplan predict --model {Path(a.output).name} -i IN -o OUT")
    return 0


def cmd_select(a) -> int:
    from runner.selection import select
    sel, table = select([Path(p) for p in a.plans], Path(a.output), progress=a.bars)
    print(table)
    print(f"wrote {a.output}; next: segplan predict --selection {a.output} -i IN -o OUT")
    return 0


def cmd_postprocess(a) -> int:
    from runner.postprocess import postprocess_cv
    from runner.workspace import Workspace
    print(postprocess_cv(Workspace(Path(a.plan)))[1])
    return 0


def cmd_demo(a) -> int:
    from runner.demo import run_demo
    return run_demo(Path(a.workdir), minutes=a.minutes, progress=a.bars)


def build_parser() -> argparse.ArgumentParser:
    from planner.bundle_file import MAX_MEMBER_MB
    from planner.plan import CONFIGURATIONS, PRESETS
    p = argparse.ArgumentParser(prog="segplan", description="Plan and run 3D medical image segmentation.")
    p.add_argument("--verbose", action="store_true",
                   help="keep TensorFlow's start-up messages (hidden by default: they are notices, not problems)")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("check-dataset", help="report every problem of a dataset folder")
    s.add_argument("dataset")
    s.add_argument("--json", action="store_true")
    s.add_argument("--workers", type=int, default=2)
    s.set_defaults(fn=cmd_check_dataset)
    s = sub.add_parser("make-phantoms", help="write synthetic chest-CT phantoms (nnU-Net raw layout)")
    s.add_argument("out")
    s.add_argument("--cases", type=int, default=20)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--scale", type=float, default=1.0, help="linear size factor: 0.25 gives 1/64 of the voxels")
    s.add_argument("--workers", type=int, default=2)
    s.set_defaults(fn=cmd_make_phantoms)
    s = sub.add_parser("import", help="convert a downloaded archive into an nnU-Net raw dataset")
    s.add_argument("source", choices=["covid19-ct-seg", "msd", "dicom"])
    s.add_argument("archives", nargs="+",
                   help="covid19-ct-seg: images zip, masks zip; msd: the task tar; dicom: a folder of DICOM series")
    s.add_argument("--labels", metavar="LABELS_DIR",
                   help="dicom: label files named like a series' id or its folder (docs/datasets.md)")
    s.add_argument("-o", "--out", required=True)
    s.set_defaults(fn=cmd_import)
    s = sub.add_parser("plan", help="fingerprint a dataset and write a plan YAML")
    s.add_argument("dataset")
    s.add_argument("-o", "--output")
    s.add_argument("--gpu-memory", type=float,
                   help="GB; default: nvidia-smi's first GPU, else 8 (resenc-m: 8, resenc-l: 24, as nnU-Net)")
    s.add_argument("--preset", default=None, choices=PRESETS,
                   help="default (nnU-Net's rules), miscnn-covid19 (the paper), cpu (a time budget), resenc-m / "
                        "resenc-l (nnU-Net's residual-encoder U-Net for 8 / 24 GB)")
    s.add_argument("--device", choices=["gpu", "cpu"], default=None,
                   help="cpu: plan for throughput within a time budget (the default when no GPU is found)")
    s.add_argument("--time-budget", type=float, default=None, help="minutes of training (cpu plans)")
    which = s.add_mutually_exclusive_group()
    which.add_argument("--configuration", choices=CONFIGURATIONS, default="3d_fullres",
                       help="nnU-Net's configuration to plan (default 3d_fullres; 3d_cascade_fullres only with "
                            "--configurations all, beside its 3d_lowres plan)")
    which.add_argument("--configurations", choices=["all"], default=None,
                       help="all: every configuration that applies (2d, 3d_fullres, and where the full-resolution "
                            "patch covers under a quarter of the median image 3d_lowres and 3d_cascade_fullres), "
                            "as DIR/NAME_<configuration>.yaml from one fingerprint")
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--force", action="store_true", help="overwrite an existing plan")
    s.add_argument("--probe", action="store_true",
                   help="GPU plans: fit patch and batch by measured peaks on this GPU (10%% margin) instead of the model")
    s.add_argument("--from", dest="from_bundle", metavar="MODEL.zip",
                   help="fine-tune: keep the bundle's network, spacing and normalisation, start from its weights")
    s.add_argument("--max-member-mb", type=float, default=None, metavar="MB",
                   help=f"with --from: largest file the bundle may unpack (default {MAX_MEMBER_MB}); raise it "
                        "only for a bundle whose source you trust")
    s.set_defaults(fn=cmd_plan)
    s = sub.add_parser("check", help="validate a (hand-edited) plan")
    s.add_argument("plan")
    s.set_defaults(fn=cmd_check)
    s = sub.add_parser("schema", help="print the plan reference: every key with its type, default and meaning")
    s.add_argument("--markdown", action="store_true", help="as Markdown (docs/plan-reference.md); the only format")
    s.set_defaults(fn=cmd_schema)
    s = sub.add_parser("preprocess", help="preprocess every case of the plan's dataset")
    s.add_argument("plan")
    s.add_argument("--workers", type=int, default=2)
    s.set_defaults(fn=cmd_preprocess)
    s = sub.add_parser("run", help="train one fold (or all), then predict and evaluate its validation cases")
    s.add_argument("plan")
    s.add_argument("--fold", required=True, help="0..folds-1 or all")
    s.add_argument("--resume", action="store_true", help="continue from checkpoint_latest")
    s.add_argument("--restart", action="store_true", help="start a finished or begun fold over")
    s.add_argument("--data-parallel", action="store_true",
                   help="split each batch over every local device (KERAS_BACKEND=jax; Keras' distribution API)")
    s.add_argument("--workers", type=int, default=2)
    s.set_defaults(fn=cmd_run)
    s = sub.add_parser("predict", help="segment new images with the trained folds or a model bundle")
    s.add_argument("plan", nargs="?", help="a plan whose folds are trained (or use --model or --selection)")
    s.add_argument("--model", help="a bundle written by `segplan export` (no dataset or work folder needed)")
    s.add_argument("--selection", metavar="FILE",
                   help="the winner of `segplan select` (a configuration or an ensemble) and its postprocessing")
    s.add_argument("-i", "--input", required=True)
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--folds", type=int, nargs="+", default=None)
    s.add_argument("--no-tta", action="store_true")
    s.add_argument("--save-probabilities", action="store_true")
    s.add_argument("--no-postprocessing", action="store_true",
                   help="skip WORK/postprocessing.yaml (or the bundle's)")
    s.add_argument("--output-format", choices=["nifti", "dicom-seg"], default="nifti",
                   help="dicom-seg: one DICOM Segmentation <id>.dcm per input DICOM series (DICOM input only)")
    s.add_argument("--max-member-mb", type=float, default=None, metavar="MB",
                   help=f"with --model: largest file the bundle may unpack (default {MAX_MEMBER_MB}); raise it only "
                        "for a bundle whose source you trust")
    s.set_defaults(fn=cmd_predict)
    s = sub.add_parser("evaluate", help="Dice, sensitivity, specificity, IoU, volumes per case and class")
    s.add_argument("--pred", required=True)
    s.add_argument("--ref", required=True)
    s.add_argument("--plan")
    s.add_argument("--hd95", action="store_true", help="95%% Hausdorff distance (mm)")
    s.add_argument("--surface-dice", type=float, metavar="MM", help="normalised surface Dice at this tolerance")
    s.set_defaults(fn=cmd_evaluate)
    s = sub.add_parser("summarize", help="the cross-validation report over finished folds")
    s.add_argument("plan")
    s.set_defaults(fn=cmd_summarize)
    s = sub.add_parser("submit", help="preprocess, the folds and summarize as jobs (SLURM via submitit, or local)")
    s.add_argument("plan")
    s.add_argument("--folds", nargs="+", default=["all"], help="all (default) or fold numbers")
    s.add_argument("--executor", choices=["slurm", "local"], default="slurm")
    s.add_argument("--partition", default=None)
    s.add_argument("--gpus-per-job", type=int, default=1, help="GPUs of each fold job (0: CPU only)")
    s.add_argument("--cpus-per-job", type=int, default=8)
    s.add_argument("--mem", type=float, default=32.0, help="GB of memory per job")
    s.add_argument("--time", type=float, default=24.0, help="hours per job; a fold stopped by it requeues itself")
    s.add_argument("--dry-run", action="store_true", help="print what would be submitted")
    s.add_argument("--data-parallel", action="store_true", help="each fold job splits its batches over its GPUs (JAX)")
    s.set_defaults(fn=cmd_submit)
    s = sub.add_parser("status", help="each fold: not started, queued, training (epoch, ETA), finished, failed")
    s.add_argument("plan")
    s.set_defaults(fn=cmd_status)
    s = sub.add_parser("export", help="write a model bundle (zip) that predicts without the dataset or work folder")
    s.add_argument("plan", nargs="?", help="a plan whose folds have finished (or use --selection)")
    s.add_argument("--selection", metavar="FILE", help="bundle the winner of `segplan select`, ensembles included")
    s.add_argument("-o", "--output", required=True, help="NAME.zip (a bundle) or, with --format, a folder")
    s.add_argument("--format", choices=["savedmodel", "onnx"], default=None,
                   help="the network alone for serving stacks, one per fold (onnx needs tf2onnx)")
    s.add_argument("--folds", type=int, nargs="+", default=None, help="default: all folds (each must have finished)")
    s.set_defaults(fn=cmd_export)
    s = sub.add_parser("postprocess", help="decide the postprocessing on the cross-validation predictions "
                                           "(summarize does it too)")
    s.add_argument("plan")
    s.set_defaults(fn=cmd_postprocess)
    s = sub.add_parser("select", help="rank each plan and every pair (probabilities averaged) on the out-of-fold "
                                      "predictions; the winner and its postprocessing")
    s.add_argument("plans", nargs="+", metavar="PLAN", help="plans whose folds have all finished, on one split")
    s.add_argument("-o", "--output", default="selection.yaml", help="the selection file (default: selection.yaml here)")
    s.set_defaults(fn=cmd_select)
    s = sub.add_parser("demo", help="phantoms -> plan -> fold 0 -> predict -> evaluate, on a CPU")
    s.add_argument("workdir", nargs="?", default="segplan_demo")
    s.add_argument("--minutes", type=float, default=DEMO_MINUTES,
                   help="training time budget in minutes (default %(default)g: the whole demo under 4 on 2 cores)")
    s.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    from planner.dataset import DatasetError
    from planner.dicom import MissingExtra
    from planner.schema import SchemaError
    from runner.locks import Busy
    args = build_parser().parse_args(argv)
    if not args.verbose and args.command in KERAS_COMMANDS:
        from runner.backend import load_quietly
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's later INFO/WARNING lines
        load_quietly()                                     # and the start-up ones that ignore it
    # progress bars on a terminal; in a log file (a pipe, `> log`) one line per epoch / case instead
    args.bars = sys.stderr.isatty()
    try:
        return args.fn(args)
    except SchemaError as e:
        print("segplan: the plan has problems:\n  " + "\n  ".join(e.problems), file=sys.stderr)
        return 2
    except (DatasetError, FileExistsError, FileNotFoundError, ValueError, Busy, MissingExtra) as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return _fail("interrupted; `segplan run PLAN --fold K --resume` continues a training run")


if __name__ == "__main__":
    sys.exit(main())
