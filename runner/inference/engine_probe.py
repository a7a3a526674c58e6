"""Which inference engine is fastest here: ``python -m segplan.runner.inference.engine_probe SPEC_JSON``
builds the planned network (random weights), exports it to ONNX once and times one network call
(``batch`` windows of ``patch``) on every installed engine (runner/inference/engines.py): median of
``calls`` after a warm-up call each. Prints one JSON line: per engine its seconds per call and its
largest difference from Keras' output; the engines not installed with why. Run by the CPU planner
in a child process (the planner never imports TensorFlow)."""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def measure(network: dict, patch: list[int], batch: int, in_channels: int, n_outputs: int, activation: str,
            calls: int = 5) -> dict:
    import keras
    from segplan.planner.plan import NetworkSection, spatial_dims
    from segplan.runner.backend import name as backend_name
    from segplan.runner.inference.engines import ENGINES, missing, onnxruntime_predictor, openvino_predictor
    from segplan.runner.inference.infer import keras_predictor
    from segplan.runner.training.model import build_unet, prediction_model
    model = prediction_model(build_unet(NetworkSection(**network), in_channels, n_outputs, activation))
    x = np.random.default_rng(0).normal(size=(batch, in_channels, *patch)).astype(np.float32)
    out = {"seconds": {}, "max_difference": {}, "not_installed": {}}
    reference = None
    with tempfile.TemporaryDirectory(prefix="segplan_engine_probe_") as tmp:
        onnx = Path(tmp) / "net.onnx"
        for engine in ENGINES:
            why = missing(engine, backend_name())
            if why:
                out["not_installed"][engine] = why
                continue
            if engine == "keras":
                predict = keras_predictor([model])
            else:
                if not onnx.exists():
                    spec = keras.InputSpec(shape=(None,) * (1 + spatial_dims(NetworkSection(**network)))
                                           + (in_channels,), dtype="float32", name="image")
                    model.export(str(onnx), format="onnx", verbose=False, input_signature=[spec])
                predict = (onnxruntime_predictor if engine == "onnxruntime" else openvino_predictor)([onnx])
            y = np.asarray(predict(x))                 # warm-up (graph tracing, compilation)
            times = []
            for _ in range(calls):
                t = time.perf_counter()
                predict(x)
                times.append(time.perf_counter() - t)
            out["seconds"][engine] = float(np.median(times))
            reference = y if reference is None else reference
            out["max_difference"][engine] = float(np.abs(y - reference).max())
    return out


def main() -> None:
    from segplan.runner import backend
    backend.load_quietly()
    spec = json.loads(sys.argv[1])
    print(json.dumps(measure(spec["network"], spec["patch"], spec["batch"], spec["in_channels"], spec["n_outputs"],
                             spec["activation"], spec.get("calls", 5))))


if __name__ == "__main__":
    main()
