"""The `segplan` command line: its parser, and main, which dispatches to segplan.runner.commands; TensorFlow is
imported only by the commands that train or predict."""
from __future__ import annotations

import argparse
import os
import sys

from segplan.runner import commands
from segplan.runner.demo import DEMO_MINUTES

KERAS_COMMANDS = ("run", "predict", "demo")


def build_parser() -> argparse.ArgumentParser:
    from segplan.planner.bundle_file import MAX_MEMBER_MB
    from segplan.planner.plan import CONFIGURATIONS, PRESETS
    p = argparse.ArgumentParser(prog="segplan", description="Plan and run 3D medical image segmentation.")
    p.add_argument("--verbose", action="store_true",
                   help="keep TensorFlow's start-up messages (hidden by default: they are notices, not problems)")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("check-dataset", help="report every problem of a dataset folder")
    s.add_argument("dataset")
    s.add_argument("--json", action="store_true")
    s.add_argument("--workers", type=int, default=2)
    s.set_defaults(fn=commands.cmd_check_dataset)
    s = sub.add_parser("make-phantoms", help="write synthetic chest-CT phantoms (nnU-Net raw layout)")
    s.add_argument("out")
    s.add_argument("--cases", type=int, default=20)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--scale", type=float, default=1.0, help="linear size factor: 0.25 gives 1/64 of the voxels")
    s.add_argument("--workers", type=int, default=2)
    s.set_defaults(fn=commands.cmd_make_phantoms)
    s = sub.add_parser("import", help="convert a downloaded archive into an nnU-Net raw dataset")
    s.add_argument("source", choices=["covid19-ct-seg", "msd", "dicom"])
    s.add_argument("archives", nargs="+",
                   help="covid19-ct-seg: images zip, masks zip; msd: the task tar; dicom: a folder of DICOM series")
    s.add_argument("--labels", metavar="LABELS_DIR",
                   help="dicom: label files named like a series' id or its folder (docs/datasets.md)")
    s.add_argument("-o", "--out", required=True)
    s.set_defaults(fn=commands.cmd_import)
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
    s.set_defaults(fn=commands.cmd_plan)
    s = sub.add_parser("check", help="validate a (hand-edited) plan")
    s.add_argument("plan")
    s.set_defaults(fn=commands.cmd_check)
    s = sub.add_parser("schema", help="print the plan reference: every key with its type, default and meaning")
    s.add_argument("--markdown", action="store_true", help="as Markdown (docs/plan-reference.md); the only format")
    s.set_defaults(fn=commands.cmd_schema)
    s = sub.add_parser("preprocess", help="preprocess every case of the plan's dataset")
    s.add_argument("plan")
    s.add_argument("--workers", type=int, default=2)
    s.set_defaults(fn=commands.cmd_preprocess)
    s = sub.add_parser("run", help="train one fold (or all), then predict and evaluate its validation cases")
    s.add_argument("plan")
    s.add_argument("--fold", required=True, help="0..folds-1 or all")
    s.add_argument("--resume", action="store_true", help="continue from checkpoint_latest")
    s.add_argument("--restart", action="store_true", help="start a finished or begun fold over")
    s.add_argument("--data-parallel", action="store_true",
                   help="split each batch over every local device (KERAS_BACKEND=jax; Keras' distribution API)")
    s.add_argument("--workers", type=int, default=2)
    s.set_defaults(fn=commands.cmd_run)
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
    s.set_defaults(fn=commands.cmd_predict)
    s = sub.add_parser("evaluate", help="Dice, sensitivity, specificity, IoU, volumes per case and class")
    s.add_argument("--pred", required=True)
    s.add_argument("--ref", required=True)
    s.add_argument("--plan")
    s.add_argument("--hd95", action="store_true", help="95%% Hausdorff distance (mm)")
    s.add_argument("--surface-dice", type=float, metavar="MM", help="normalised surface Dice at this tolerance")
    s.set_defaults(fn=commands.cmd_evaluate)
    s = sub.add_parser("summarize", help="the cross-validation report over finished folds")
    s.add_argument("plan")
    s.set_defaults(fn=commands.cmd_summarize)
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
    s.set_defaults(fn=commands.cmd_submit)
    s = sub.add_parser("status", help="each fold: not started, queued, training (epoch, ETA), finished, failed")
    s.add_argument("plan")
    s.set_defaults(fn=commands.cmd_status)
    s = sub.add_parser("export", help="write a model bundle (zip) that predicts without the dataset or work folder")
    s.add_argument("plan", nargs="?", help="a plan whose folds have finished (or use --selection)")
    s.add_argument("--selection", metavar="FILE", help="bundle the winner of `segplan select`, ensembles included")
    s.add_argument("-o", "--output", required=True, help="NAME.zip (a bundle) or, with --format, a folder")
    s.add_argument("--format", choices=["savedmodel", "onnx"], default=None,
                   help="the network alone for serving stacks, one per fold (onnx needs tf2onnx)")
    s.add_argument("--folds", type=int, nargs="+", default=None, help="default: all folds (each must have finished)")
    s.set_defaults(fn=commands.cmd_export)
    s = sub.add_parser("postprocess", help="decide the postprocessing on the cross-validation predictions "
                                           "(summarize does it too)")
    s.add_argument("plan")
    s.set_defaults(fn=commands.cmd_postprocess)
    s = sub.add_parser("select", help="rank each plan and every pair (probabilities averaged) on the out-of-fold "
                                      "predictions; the winner and its postprocessing")
    s.add_argument("plans", nargs="+", metavar="PLAN", help="plans whose folds have all finished, on one split")
    s.add_argument("-o", "--output", default="selection.yaml", help="the selection file (default: selection.yaml here)")
    s.add_argument("--seconds-per-case", type=float, default=None, metavar="S",
                   help="also vary the prediction settings (engine, window overlap, mirroring, folds), score and time "
                        "each on out-of-fold cases here, and choose the most accurate within S seconds per case")
    s.add_argument("--cases", default=None, metavar="N",
                   help="with --seconds-per-case: out-of-fold cases to score and time each setting on (default 20, "
                        "spread over the folds; all: every case)")
    s.add_argument("--overlaps", type=float, nargs="+", default=None, metavar="O",
                   help="with --seconds-per-case: window overlaps to try (default 0.5 0.33 0.25)")
    s.set_defaults(fn=commands.cmd_select)
    s = sub.add_parser("demo", help="phantoms -> plan -> fold 0 -> predict -> evaluate, on a CPU")
    s.add_argument("workdir", nargs="?", default="segplan_demo")
    s.add_argument("--minutes", type=float, default=DEMO_MINUTES,
                   help="training time budget in minutes (default %(default)g: the whole demo about 4 on 2 cores)")
    s.set_defaults(fn=commands.cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    from segplan.planner.dataset import DatasetError
    from segplan.planner.dicom import MissingExtra
    from segplan.planner.schema import SchemaError
    from segplan.runner.locks import Busy
    args = build_parser().parse_args(argv)
    if not args.verbose and args.command in KERAS_COMMANDS:
        from segplan.runner.backend import load_quietly
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
        return commands.fail(str(e))
    except KeyboardInterrupt:
        return commands.fail("interrupted; `segplan run PLAN --fold K --resume` continues a training run")


if __name__ == "__main__":
    sys.exit(main())
