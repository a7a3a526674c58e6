"""What each `segplan` sub-command does with its parsed arguments (segplan.runner.cli builds the parser
and dispatches): one ``cmd_*`` function per command, returning the exit status. Each imports
what it needs when it runs, so that a command that neither trains nor predicts never loads
TensorFlow."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def fail(msg: str) -> int:
    print(f"segplan: error: {msg}", file=sys.stderr)
    return 2


def cmd_check_dataset(a) -> int:
    from segplan.planner.integrity import check_dataset, problems_to_json
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
    from segplan.datasets.phantoms import make_phantoms
    out = make_phantoms(a.out, cases=a.cases, seed=a.seed, scale=a.scale, workers=a.workers, progress=a.bars)
    print(f"wrote {a.cases} phantoms to {out}")
    return 0


def cmd_import(a) -> int:
    from segplan.datasets import importers
    if (a.labels is not None) != (a.source == "dicom"):
        return fail("import dicom DIR needs --labels LABELS_DIR, and only it takes --labels")
    if a.source == "dicom":
        from segplan.datasets.dicom_import import import_dicom
        if len(a.archives) != 1:
            return fail(f"import dicom takes one folder of DICOM series, got {len(a.archives)}")
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
    from segplan.planner.bundle_file import MAX_MEMBER_MB
    from segplan.planner.planning import plan_configurations, plan_dataset
    if a.max_member_mb is not None and a.from_bundle is None:
        return fail("--max-member-mb limits what a bundle unpacks: it goes with --from")
    common = dict(gpu_memory=a.gpu_memory, preset=a.preset, workers=a.workers, force=a.force, device=a.device,
                  time_budget=a.time_budget, progress=a.bars, gpu_probe=a.probe)
    output = Path(a.output) if a.output else None
    if a.configurations:
        if a.from_bundle is not None:
            return fail("--from keeps one trained network: plan one --configuration with it, not --configurations all")
        for c, path in plan_configurations(Path(a.dataset), output, **common).items():
            print(f"{c}: plan written to {path}; edit it, then: segplan check {path}")
        return 0
    path = plan_dataset(Path(a.dataset), output, **common, from_bundle=a.from_bundle, configuration=a.configuration,
                        max_member_mb=MAX_MEMBER_MB if a.max_member_mb is None else a.max_member_mb)
    print(f"plan written to {path}; edit it, then: segplan check {path}")
    return 0


def cmd_check(a) -> int:
    from segplan.planner.planning import check_plan_report
    print(check_plan_report(Path(a.plan)))
    return 0


def cmd_schema(a) -> int:
    from segplan.planner.plan_reference import markdown
    print(markdown(), end="")
    return 0


def cmd_preprocess(a) -> int:
    from segplan.runner.preprocessing.preprocess import preprocess_dataset
    from segplan.runner.workspace import Workspace
    out = preprocess_dataset(Workspace(Path(a.plan)), workers=a.workers, progress=a.bars)
    print(f"preprocessed cases in {out}")
    return 0


def cmd_run(a) -> int:
    from segplan.runner.pipeline import run_fold
    from segplan.runner.workspace import Workspace
    ws = Workspace(Path(a.plan))
    n = ws.plan.cross_validation.folds
    folds = range(n) if a.fold == "all" else [int(a.fold)]
    for k in folds:
        if not 0 <= k < n:
            return fail(f"--fold {k}: the plan has folds 0..{n - 1}")
        run_fold(ws, k, resume=a.resume, restart=a.restart, workers=a.workers, progress=a.bars,
                 data_parallel=a.data_parallel)
    return 0


def cmd_predict(a) -> int:
    if sum(x is not None for x in (a.plan, a.model, a.selection)) != 1:
        return fail("predict needs a plan (its work folder's folds), --model BUNDLE.zip or --selection FILE, "
                     "one of them")
    if a.folds is not None and len(set(a.folds)) != len(a.folds):
        return fail(f"--folds {' '.join(map(str, a.folds))}: a fold given twice would count twice in the average")
    if a.model is None and a.max_member_mb is not None:
        return fail("--max-member-mb limits what a bundle unpacks: it goes with --model")
    from segplan.runner.inference.inputs import refuse_overwrite
    refuse_overwrite(Path(a.input), Path(a.output))   # -o IN: refused before any network is loaded
    from segplan.runner.inference.predictor import Predictor
    # every option applies to a plan, a bundle and a selection alike
    options = dict(folds=a.folds, tta=not a.no_tta, postprocessing=not a.no_postprocessing)
    if a.model is not None:
        from segplan.planner.bundle_file import MAX_MEMBER_MB
        predictor = Predictor.from_bundle(Path(a.model), **options,
                                          max_member_mb=MAX_MEMBER_MB if a.max_member_mb is None else a.max_member_mb)
    elif a.selection is not None:
        predictor = Predictor.from_selection(Path(a.selection), **options)
    else:
        predictor = Predictor.from_plan(Path(a.plan), **options)
    predictor.predict_folder(Path(a.input), Path(a.output), save_probabilities=a.save_probabilities,
                             progress=a.bars, output_format=a.output_format)
    return 0


def cmd_evaluate(a) -> int:
    from segplan.runner.evaluation.evaluate import evaluate_folder
    summary = evaluate_folder(Path(a.pred), Path(a.ref), Path(a.plan) if a.plan else None, hd95=a.hd95,
                              nsd_tolerance=a.surface_dice)
    print(summary)
    return 0


def cmd_summarize(a) -> int:
    from segplan.runner.evaluation.report import summarize
    from segplan.runner.workspace import Workspace
    print(summarize(Workspace(Path(a.plan))))
    return 0


def cmd_submit(a) -> int:
    from segplan.runner.cluster import Resources, submit
    folds = None if a.folds == ["all"] else [int(k) for k in a.folds]
    res = Resources(a.partition, a.gpus_per_job, a.cpus_per_job, a.mem, a.time)
    print("\n".join(submit(Path(a.plan), folds, a.executor, res, dry_run=a.dry_run, data_parallel=a.data_parallel)))
    return 0


def cmd_status(a) -> int:
    from segplan.runner.status import status
    print(status(Path(a.plan)))
    return 0


def cmd_export(a) -> int:
    if (a.plan is None) == (a.selection is None):
        return fail("export needs a plan or --selection FILE, one of the two")
    if a.selection is not None:
        if a.format:
            return fail("--format writes one plan's networks; a selection may be an ensemble: export a plan")
        from segplan.runner.inference.bundle import export_selection
        print(f"wrote {export_selection(Path(a.selection), Path(a.output), a.folds)}; on another machine: "
              f"segplan predict --model {Path(a.output).name} -i IN -o OUT")
        return 0
    if a.format:
        from segplan.runner.inference.bundle import export_network
        for path in export_network(Path(a.plan), Path(a.output), a.format, a.folds):
            print(f"wrote {path}")
        return 0
    from segplan.runner.inference.bundle import export
    print(f"wrote {export(Path(a.plan), Path(a.output), a.folds)}; on another machine: "
          f"segplan predict --model {Path(a.output).name} -i IN -o OUT")
    return 0


def cmd_select(a) -> int:
    from segplan.runner.evaluation.selection import select
    from segplan.runner.evaluation.settings_search import SAMPLE
    if a.seconds_per_case is None and (a.overlaps is not None or a.cases is not None):
        return fail("--cases and --overlaps choose how prediction settings are searched: give --seconds-per-case too")
    cases = a.cases or str(SAMPLE)
    if cases != "all" and not (cases.isdecimal() and cases.isascii()):
        return fail(f"--cases {cases}: a number of cases above 0, or all")
    cases = None if cases == "all" else int(cases)
    sel, table = select([Path(p) for p in a.plans], Path(a.output), progress=a.bars,
                        seconds_per_case=a.seconds_per_case, cases=cases, overlaps=a.overlaps)
    print(table)
    print(f"wrote {a.output}; next: segplan predict --selection {a.output} -i IN -o OUT")
    return 0


def cmd_postprocess(a) -> int:
    from segplan.runner.postprocessing.postprocess import postprocess_cv
    from segplan.runner.workspace import Workspace
    print(postprocess_cv(Workspace(Path(a.plan)))[1])
    return 0


def cmd_demo(a) -> int:
    from segplan.runner.demo import run_demo
    return run_demo(Path(a.workdir), minutes=a.minutes, progress=a.bars)
