"""`segplan plan` and `segplan check`: fingerprint (cached) -> plan YAML (one configuration, or every
one that applies, from one fingerprint); validate a hand-edited plan."""
from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

from segplan.planner.augmentation import MIRROR_TTA_EVIDENCE, MIRROR_TTA_MIN_P
from segplan.planner.build import gpu_memory_budget, gpu_present, make_plan
from segplan.planner.bundle_file import MAX_MEMBER_MB
from segplan.planner.configurations import plan_family
from segplan.planner.cpu_plan import make_cpu_plan
from segplan.planner.finetune import plan_from_bundle
from segplan.planner.fingerprint import fingerprint_for
from segplan.planner.memory import estimate_for_plan
from segplan.planner.plan import CONFIGURATIONS, PRESETS, supervised_levels
from segplan.planner.plan_file import load_plan, save_plan
from segplan.planner.probing import fit_by_probe


def default_plan_path(dataset: Path) -> Path:
    return Path("plans") / f"{dataset.resolve().name}.yaml"


def plan_dataset(dataset: Path, output: Path | None = None, gpu_memory: float | None = None,
                 preset: str | None = None, workers: int = 2, force: bool = False, device: str | None = None,
                 time_budget: float | None = None, progress: bool = True, probe: bool = True,
                 from_bundle: Path | None = None, gpu_probe: bool = False,
                 max_member_mb: float = MAX_MEMBER_MB, configuration: str = "3d_fullres") -> Path:
    """Write the plan for ``dataset``; never overwrites an existing plan unless ``force``.

    With no device, preset or memory budget given and no GPU found, the plan is made for this CPU
    (and says so); ``probe=False`` skips the CPU speed probe (tests). ``gpu_probe`` fits a GPU plan's
    patch and batch by measured peaks on this machine's GPU (planner/probing.py); without a GPU the
    fitted memory model stands and the plan says so. ``max_member_mb`` bounds each file unpacked from
    ``from_bundle`` (planner/bundle_file.py). ``configuration``: one of nnU-Net's configurations
    (planner/configurations.py); a 3d_cascade_fullres plan is written only with its 3d_lowres plan
    (``plan_configurations``)."""
    dataset = Path(dataset)
    output = Path(output) if output else default_plan_path(dataset)
    if configuration not in CONFIGURATIONS:
        raise ValueError(f"unknown configuration '{configuration}'; known: {', '.join(CONFIGURATIONS)}")
    if configuration == "3d_cascade_fullres":
        raise ValueError("a 3d_cascade_fullres plan is written with the 3d_lowres plan it builds on: "
                         f"segplan plan {dataset} -o {output} --configurations all")
    _refuse_existing([output], force)
    plan, reasons = _plan_maker(dataset, output.parent, gpu_memory, preset, workers, device, time_budget, progress,
                                probe, gpu_probe)(configuration, output)
    if from_bundle is not None:
        plan = plan_from_bundle(plan, reasons, Path(from_bundle), output, max_member_mb)
    save_plan(plan, output, reasons)
    return output


def plan_configurations(dataset: Path, output: Path | None = None, gpu_memory: float | None = None,
                        preset: str | None = None, workers: int = 2, force: bool = False, device: str | None = None,
                        time_budget: float | None = None, progress: bool = True, probe: bool = True,
                        gpu_probe: bool = False) -> dict[str, Path]:
    """`segplan plan --configurations all`: DIR/NAME_<configuration>.yaml for every configuration
    that applies (segplan.planner.configurations.plan_family), side by side, from one fingerprint; the
    cascade's previous_stage names the 3d_lowres plan beside it. Nothing is written unless every
    plan could be made; an existing one is kept unless ``force``. Returns configuration -> path."""
    dataset = Path(dataset)
    output = Path(output) if output else default_plan_path(dataset)
    paths = {c: output.with_name(f"{output.stem}_{c}.yaml") for c in CONFIGURATIONS}
    _refuse_existing(list(paths.values()), force)
    make = _plan_maker(dataset, output.parent, gpu_memory, preset, workers, device, time_budget, progress, probe,
                       gpu_probe)
    family = plan_family(lambda c: make(c, paths[c]))
    if "3d_cascade_fullres" in family:
        plan, reasons = family["3d_cascade_fullres"]
        reasons["previous_stage"] = ("the 3d_lowres plan beside this one, planned with it from the same fingerprint; "
                                     "checked when loaded (a 3d_lowres plan of this dataset, labels and split)")
        family["3d_cascade_fullres"] = (plan.replace(previous_stage=paths["3d_lowres"].name), reasons)
    for c, (plan, reasons) in family.items():
        save_plan(plan, paths[c], reasons)
    return {c: paths[c] for c in family}


def _refuse_existing(paths: list[Path], force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise FileExistsError(f"{', '.join(existing)} exist{'s' if len(existing) == 1 else ''} (hand edits would be "
                              "lost); pass --force to overwrite")


def _plan_maker(dataset: Path, plans_dir: Path, gpu_memory: float | None, preset: str | None, workers: int,
                device: str | None, time_budget: float | None, progress: bool, probe: bool, gpu_probe: bool):
    """The dataset fingerprinted once (cached beside the plans), and ``make(configuration, path)`` ->
    (plan, reasons) for the plan file ``path`` (its name and work folder follow from it)."""
    why = ""
    if device is None and preset is None and gpu_memory is None and not gpu_present():
        device, why = "cpu", " (no GPU found, so the plan is made for this CPU; --device gpu plans for a GPU)"
    preset = preset or ("cpu" if device == "cpu" else "default")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset '{preset}'; known: {', '.join(PRESETS)}")
    Path(plans_dir).mkdir(parents=True, exist_ok=True)
    fp, _ = fingerprint_for(dataset, fingerprint_cache(dataset, plans_dir), workers=workers, progress=progress)

    def make(configuration: str, output: Path):
        dataset_rel, work_rel = _rel(dataset, output), _rel(output.parent / "work" / output.stem, output)
        if preset == "cpu":
            return make_cpu_plan(fp, output.stem, dataset_rel, work_rel, time_budget=time_budget,
                                 splits_file=_splits(dataset, output), probe=probe, why=why,
                                 configuration=configuration)
        gb, source = gpu_memory_budget(gpu_memory, preset)

        def replan(model_gb: float):
            plan, reasons = make_plan(fp, output.stem, dataset_rel, work_rel, model_gb, source, preset,
                                      _splits(dataset, output), configuration=configuration)
            return plan.replace(memory=dataclasses.replace(plan.memory, gpu_memory_gb=gb)), reasons
        return _gpu_plan(replan, gb, gpu_probe)
    return make


def _gpu_plan(replan, gb: float, gpu_probe: bool):
    """The model's plan, or with ``gpu_probe`` on a machine with a GPU, the plan fitted by measured peaks."""
    if not gpu_probe:
        return replan(gb)
    if not gpu_present():
        plan, reasons = replan(gb)
        reasons["memory.measured_gb"] = ("not measured: --probe found no GPU here, so the fitted memory model "
                                         "(planner/memory.py) sized the patch and batch")
        return plan, reasons
    plan, reasons, peak, lines = fit_by_probe(replan, gb)
    plan = plan.replace(memory=dataclasses.replace(plan.memory, measured_gb=peak))
    reasons["memory.measured_gb"] = "segplan plan --probe on this GPU: " + "; ".join(lines)
    return plan, reasons


def fingerprint_cache(dataset: Path, plans_dir: Path) -> Path:
    """The fingerprint cache of a dataset, beside the plans: named by the dataset (its folder name
    and resolved path), so every plan of that dataset, under any name, reuses it; the cache itself
    is checked against the files' names, sizes and times before it is trusted."""
    resolved = str(Path(dataset).resolve())
    return Path(plans_dir) / f"{Path(resolved).name}-{hashlib.sha1(resolved.encode()).hexdigest()[:8]}.fingerprint.yaml"


def _rel(target: Path, plan_path: Path) -> str:
    return os.path.relpath(Path(target).resolve(), Path(plan_path).resolve().parent)


def _splits(dataset: Path, plan_path: Path) -> str | None:
    f = dataset / "splits_final.json"
    return _rel(f, plan_path) if f.exists() else None


def check_plan_report(path: Path) -> str:
    """Validate (raises SchemaError on problems) and report the memory estimate against the budget."""
    plan = load_plan(path)
    est = estimate_for_plan(plan)
    budget = plan.memory.gpu_memory_gb
    net = plan.network
    kind = (f"residual encoder ({', '.join(map(str, net.blocks_per_stage))} blocks)"
            if net.architecture == "residual_encoder" else "plain")
    outputs = len(supervised_levels(net))
    config = plan.configuration + (f", slices along {'zyx'[plan.slice_axis]}" if plan.slice_axis is not None else "")
    if plan.previous_stage:
        config += f", previous_stage {plan.previous_stage} (a 3d_lowres plan of this dataset, labels and split)"
    lines = [f"{path}: valid plan '{plan.name}' ({plan.preset}, {plan.device}, {config})",
             f"  patch {plan.training.patch_size} x batch {plan.training.batch_size}, "
             f"{len(net.filters)} stages {net.filters[0]}..{max(net.filters)} filters, {kind}"
             + (f", deep supervision ({outputs} outputs)" if outputs > 1 else ""),
             f"  estimated training memory {est:.2f} GB of a {budget:g} GB budget"]
    if plan.device == "cpu":
        lines[-1] = (f"  estimated peak memory of `segplan run`: {plan.memory.estimate_gb:g} GB of system memory "
                     f"(training process {est:.2f} GB); a CPU plan's "
                     f"{plan.training.schedule.time_budget_minutes} min budget is what limits it")
    if plan.memory.measured_gb is not None:
        lines.append(f"  measured by --probe when planned: {plan.memory.measured_gb:g} GB peak for the planned patch "
                     "and batch (re-plan with --probe after editing them)")
    elif plan.device == "gpu" and est > budget:
        lines.append(f"  WARNING: the estimate exceeds the budget by {est - budget:.2f} GB: training may run out of "
                     "GPU memory; lower training.batch_size or training.patch_size, or re-plan with --gpu-memory")
    return "\n".join(lines + mirroring_lines(plan) + label_handling_lines(plan.dataset))


def mirroring_prepared(plan) -> bool:
    """Whether training mirrors often enough along some axis for test-time mirroring to help."""
    aug = plan.training.augmentation
    return aug.mirror_p >= MIRROR_TTA_MIN_P and bool(aug.mirror_axes)


def mirroring_lines(plan) -> list[str]:
    """`segplan check`'s warning on test-time mirroring that training did not prepare the network for."""
    aug = plan.training.augmentation
    if not plan.inference.mirroring or mirroring_prepared(plan):
        return []
    return ["  WARNING: inference.mirroring averages flipped views, but training mirrors "
            + (f"only {aug.mirror_p:.0%} of the patches (training.augmentation.mirror_p {aug.mirror_p:g})"
               if aug.mirror_axes else "along no axis (training.augmentation.mirror_axes is empty)")
            + f": predictions get worse ({MIRROR_TTA_EVIDENCE}); set inference.mirroring: "
            f"false, or mirror_p >= {MIRROR_TTA_MIN_P:g} and train again"]


def label_handling_lines(ds) -> list[str]:
    """`segplan check`'s lines on a plan's regions and ignore label (none for a plan without them)."""
    lines = []
    if ds.regions:
        regions = ", ".join(f"{n} {v} -> {o}" for (n, v), o in zip(ds.regions.items(), ds.regions_class_order))
        lines.append(f"  {len(ds.regions)} regions, one sigmoid output each, written back in order: {regions}")
    if ds.ignore_label is not None:
        lines.append(f"  ignore label {ds.ignore_label}: unannotated voxels, left out of the loss, patch centres and "
                     "evaluation")
    return lines
