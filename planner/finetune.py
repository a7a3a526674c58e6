"""Plans that start from a trained model bundle (`segplan plan NEW_DATASET --from MODEL.zip`).

What the weights depend on is kept from the bundle: the configuration (it must be the plan's), the
network, the slice axis of a 2d model, the target spacing and resampling, the normalisation of each channel (scheme, clip and statistics: the weights were
trained on that input distribution), and the channel count. Everything else (patch, batch, labels,
schedule, folds, ...) is planned for the new dataset. A different class count is allowed: the
network's last layer is then trained from scratch, and the plan says so.
"""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

from segplan.planner.labels import label_model
from segplan.planner.bundle_file import BUNDLE_VERSION, MAX_MEMBER_MB, BundleError, bundle_plan, open_bundle
from segplan.planner.memory import estimate_for_plan
from segplan.planner.plan import Plan, pool_divisor

INITIAL_WEIGHTS_SUFFIX = ".initial.weights.h5"


def plan_from_bundle(new: Plan, reasons: dict, bundle: Path, plan_path: Path,
                     max_member_mb: float = MAX_MEMBER_MB) -> Plan:
    """``new`` (planned for the new dataset) with the bundle's network, spacing and normalisation,
    and ``training.initial_weights`` pointing at fold 0's weights, copied beside ``plan_path``."""
    with tempfile.TemporaryDirectory(prefix="segplan_from_") as tmp:
        manifest = open_bundle(Path(bundle), Path(tmp), max_member_mb)
        if manifest["bundle_version"] != BUNDLE_VERSION:
            raise BundleError(f"{bundle}: holds {len(manifest['models'])} plans (an ensemble, or a cascade and its "
                              "previous stage); fine-tuning starts from one plan's bundle: `segplan export PLAN`")
        k = manifest["folds"][0]
        old = bundle_plan(Path(bundle), Path(tmp), k)
        if old.configuration != new.configuration:
            raise BundleError(f"{bundle}: a {old.configuration} model, and this plan is {new.configuration}: plan "
                              f"with --configuration {old.configuration} to fine-tune it")
        if len(old.dataset.channels) != len(new.dataset.channels):
            raise BundleError(f"{bundle}: trained on {len(old.dataset.channels)} channels "
                              f"({', '.join(old.dataset.channels)}); this dataset has {len(new.dataset.channels)}")
        weights = Path(plan_path).with_name(Path(plan_path).stem + INITIAL_WEIGHTS_SUFFIX)
        weights.write_bytes((Path(tmp) / f"folds/{k}/model.weights.h5").read_bytes())
    norms = [dataclasses.replace(o, channel=n.channel) for o, n in zip(old.intensity.normalization,
                                                                       new.intensity.normalization)]
    div = pool_divisor(old.network)
    patch = [max(d, -(-p // d) * d) for p, d in zip(new.training.patch_size, div)]
    plan = new.replace(network=old.network, resampling=old.resampling, slice_axis=old.slice_axis,
                       dataset=dataclasses.replace(new.dataset, orientation=old.dataset.orientation),
                       intensity=dataclasses.replace(new.intensity, normalization=norms,
                                                     windowed_range=old.intensity.windowed_range),
                       training=dataclasses.replace(new.training, patch_size=patch, initial_weights=weights.name))
    plan = plan.replace(memory=dataclasses.replace(plan.memory, estimate_gb=round(estimate_for_plan(plan), 2)))
    src = f"{Path(bundle).name} (fold {k} of plan '{old.name}')"
    for key in ("network.filters", "resampling.target_spacing", "intensity.normalization", "dataset.orientation"):
        reasons[key] = f"kept from {src}: the weights depend on it"
    reasons["training.patch_size"] = f"planned for this dataset, rounded to the kept network's pooling {div}"
    a, b = label_model(new), label_model(old)
    head = (f"; the last layer is trained from scratch: {a.n_outputs} {a.activation} outputs here "
            f"({', '.join(a.outputs)}), {b.n_outputs} {b.activation} outputs in the bundle ({', '.join(b.outputs)})"
            if (a.n_outputs, a.activation) != (b.n_outputs, b.activation) else "")
    reasons["training.initial_weights"] = f"fold {k}'s weights from {src}, copied beside this plan{head}"
    return plan
