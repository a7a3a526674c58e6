"""The network as an ONNX file: written from a Keras prediction model (Keras' exporter, tf2onnx under
the TensorFlow backend), its tensors named for serving (``image`` in; ``softmax``, or ``sigmoid``
for a region plan, out) and what a server must know in its metadata. Used by `segplan export
--format onnx` and by the inference engines (runner/inference/engines.py), which keep one per fold."""
from __future__ import annotations

import json
from pathlib import Path

from segplan.planner.fileio import atomic
from segplan.planner.labels import label_model
from segplan.planner.plan import input_channels, patch_axes, spatial_dims


def export_onnx(model, plan, fold: int, target: Path) -> Path:
    """Write ``model`` (a prediction model: one output) as ONNX to ``target`` atomically, its tensors
    named and its metadata written as `segplan export --format onnx` does. Always a float32 network:
    a model built under a mixed-precision policy (the process that trained it) is rebuilt in float32
    with its weights first (a bfloat16 graph is one ONNX Runtime refuses to load). Several processes
    may export the same fold at once: each writes its own temporary file."""
    import keras

    target.parent.mkdir(parents=True, exist_ok=True)
    model = _in_float32(model, plan)
    spec = keras.InputSpec(shape=(None,) * (1 + spatial_dims(plan.network)) + (input_channels(plan),),
                           dtype="float32", name="image")
    with atomic(target, own=True) as tmp:
        model.export(str(tmp), format="onnx", verbose=False, input_signature=[spec])
        finish_onnx(tmp, plan, fold)
    return target


def _in_float32(model, plan):
    """``model`` itself if its layers compute in float32, else the plan's prediction network built
    under the float32 policy with ``model``'s weights (variables are float32 under every policy)."""
    import keras
    if all(getattr(layer, "compute_dtype", "float32") == "float32" for layer in model.layers):
        return model
    from segplan.runner.training.model import plan_network, prediction_model
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        clone = prediction_model(plan_network(plan))
        clone.set_weights(model.get_weights())
    finally:
        keras.mixed_precision.set_global_policy(policy)
    return clone


def finish_onnx(path: Path, plan, fold: int) -> None:
    """Name the exported graph's tensors for serving, ``image`` in and the output by what it is
    (``softmax``, or ``sigmoid`` for a region plan's one sigmoid per region), and record what a
    server must know in its metadata (``onnx_metadata``)."""
    import onnx
    lm = label_model(plan)
    model = onnx.load(str(path))
    if len(model.graph.input) != 1 or len(model.graph.output) != 1:
        raise ValueError(f"{path}: expected one input and one output, the exporter wrote "
                         f"{len(model.graph.input)} and {len(model.graph.output)}")
    old, new = model.graph.output[0].name, lm.activation
    for node in model.graph.node:
        node.output[:] = [new if o == old else o for o in node.output]
        node.input[:] = [new if i == old else i for i in node.input]
    model.graph.output[0].name = new
    for value in (model.graph.input[0], model.graph.output[0]):
        for dim, name in zip(value.type.tensor_type.shape.dim, ("batch", *patch_axes(plan))):
            dim.dim_param = name
    for key, value in onnx_metadata(plan, fold).items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def onnx_metadata(plan, fold: int) -> dict[str, str]:
    """What an exported network holds, as string key -> value (JSON where structured): the fold and
    plan; the output's kind (softmax or sigmoid), its channels by name, the labels, the regions and
    their order, the ignore label and the rule from outputs to a label map (the plan's label model);
    the spatial axes (2d or 3d) and the orientation the input is brought to before them (null: as
    stored), and the input channels, a cascade's extra channels named; the patch,
    overlap and weighting segplan tiles with; and the layout in words."""
    lm = label_model(plan)
    axes = patch_axes(plan)
    inputs = list(plan.dataset.channels)
    if plan.configuration == "3d_cascade_fullres":
        inputs += [f"previous_stage_{name}" for name, v in lm.labels.items() if v != 0]
    info = lm.describe()
    meta = {"segplan.fold": str(fold), "segplan.plan": plan.name,
            "segplan.output": info["output"], "segplan.output_channels": json.dumps(info["channels"]),
            "segplan.labels": json.dumps(info["labels"]), "segplan.regions": json.dumps(info["regions"]),
            "segplan.regions_class_order": json.dumps(info["regions_class_order"]),
            "segplan.ignore_label": json.dumps(info["ignore_label"]),
            "segplan.to_label_map": info["to_label_map"],
            "segplan.spatial_axes": axes, "segplan.input_channels": json.dumps(inputs),
            "segplan.orientation": json.dumps(plan.dataset.orientation),
            "segplan.patch_size": json.dumps(plan.training.patch_size),
            "segplan.overlap": str(plan.inference.overlap), "segplan.weighting": plan.inference.weighting}
    cascade = (f"; channels {len(plan.dataset.channels)}..{len(inputs) - 1} are the previous stage's label map, "
               "one-hot per foreground label" if len(inputs) > len(plan.dataset.channels) else "")
    outputs = ("one sigmoid per region (they may overlap; not a softmax)" if lm.has_regions
               else "softmax over the labels")
    meta["segplan.layout"] = (f"input image (batch, {', '.join(axes)}, channels) float32 after segplan's "
                              f"preprocessing{cascade}; output {lm.activation} (batch, {', '.join(axes)}, "
                              f"{len(lm.outputs)}): {outputs}, channels in the order of segplan.output_channels")
    return meta
