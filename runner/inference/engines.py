"""Inference engines (``inference.engine``): the trained network run by Keras on its backend, or
exported to ONNX once per fold and run by ONNX Runtime or OpenVINO, which on a CPU are faster per
window than Keras (issue 40). The sliding window, the preprocessing and everything after stay
segplan's: an engine is only a different ``predict`` for ``sliding_window``, (b, c, *patch) ->
(b, outputs, *patch).

The exported network is made once per fold and kept beside its weights in the work folder,
``fold_K/exported/<weights file>-<first 16 hex of its SHA-256>.onnx``: new weights (a resumed or
retrained fold, the other checkpoint) get a new file, the same weights reuse it. Where there is no
work folder (a bundle) it is exported into a temporary folder for the process. Exporting needs
the TensorFlow backend and tf2onnx (Keras' ONNX exporter); the engines are optional packages,
``pip install 'segplan[cpu]'``: a missing one is refused by name, saying what to install.
"""
from __future__ import annotations

import hashlib
import importlib.util
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from segplan.runner.inference.infer import keras_predictor
from segplan.runner.inference.onnx_file import export_onnx

ENGINES = ("keras", "onnxruntime", "openvino")
NEEDS = {"onnxruntime": ("onnxruntime", "tf2onnx", "onnx"), "openvino": ("openvino", "tf2onnx", "onnx")}
EXPORTED = "exported"


class EngineMissing(ValueError):
    """An engine the plan names whose package (or exporter) is not installed."""


def missing(engine: str, backend: str) -> str | None:
    """Why ``engine`` cannot run here (what to install or change), or None."""
    if engine == "keras":
        return None
    if engine not in ENGINES:
        return f"inference.engine: '{engine}' is not one of {', '.join(ENGINES)}"
    gone = [m for m in NEEDS[engine] if importlib.util.find_spec(m) is None]
    if gone:
        return (f"inference.engine: {engine} needs {' and '.join(gone)}, not installed: pip install 'segplan[cpu]' "
                f"(or pip install {' '.join(gone)}); or set inference.engine: keras")
    if backend != "tensorflow":
        return (f"inference.engine: {engine} runs the network exported to ONNX, which Keras writes under the "
                f"TensorFlow backend only (this is {backend}): run under KERAS_BACKEND=tensorflow, or set "
                "inference.engine: keras")
    return None


def installed(backend: str) -> list[str]:
    """The engines that can run here, keras first."""
    return [e for e in ENGINES if missing(e, backend) is None]


def weights_key(weights: Path) -> str:
    """The first 16 hex digits of the weights file's SHA-256: what an exported network is made from."""
    h = hashlib.sha256()
    with open(weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def exported_path(weights: Path) -> Path:
    """Where the network of ``weights`` is kept once exported (beside them, keyed by their content)."""
    weights = Path(weights)
    stem = weights.name.split(".")[0]
    return weights.parent / EXPORTED / f"{stem}-{weights_key(weights)}.onnx"


def onnx_files(plan, models: list, weights: list[Path] | None, folds: list[int] | None = None) -> list[Path]:
    """One ONNX file per model: the kept export of its weights (made now if missing), or with no
    weights paths a fresh export into a temporary folder that lives as long as the process."""
    folds = folds if folds is not None else list(range(len(models)))
    if weights is None:
        tmp = Path(tempfile.mkdtemp(prefix="segplan_engine_"))
        return [export_onnx(m, plan, k, tmp / f"model_{k}.onnx") for m, k in zip(models, folds)]
    out = []
    for m, w, k in zip(models, weights, folds):
        path = exported_path(w)
        out.append(path if path.exists() else export_onnx(m, plan, k, path))
    return out


def onnxruntime_predictor(paths: list[Path]) -> Callable[[np.ndarray], np.ndarray]:
    """(b, c, *patch) -> (b, k, *patch): the ONNX networks (folds) on ONNX Runtime's CPU provider, averaged."""
    import onnxruntime
    sessions = [onnxruntime.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in paths]

    def predict(batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(np.moveaxis(batch, 1, -1), dtype=np.float32)
        out = sum(s.run(None, {"image": x})[0] for s in sessions) / len(sessions)
        return np.moveaxis(out, -1, 1)
    return predict


def openvino_predictor(paths: list[Path]) -> Callable[[np.ndarray], np.ndarray]:
    """(b, c, *patch) -> (b, k, *patch): the ONNX networks (folds) compiled by OpenVINO for the CPU
    (latency hint: one call uses every core), averaged."""
    import openvino
    core = openvino.Core()
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}  # not bf16 on AMX/AVX512_BF16 CPUs
    compiled = [core.compile_model(core.read_model(str(p)), "CPU", config) for p in paths]

    def predict(batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(np.moveaxis(batch, 1, -1), dtype=np.float32)
        out = sum(np.asarray(c(x)[c.output(0)]) for c in compiled) / len(compiled)
        return np.moveaxis(out, -1, 1)
    return predict


def engine_predictor(plan, models: list, weights: list[Path] | None = None,
                     folds: list[int] | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """The plan's ``inference.engine`` as a predictor of the folds' ``models`` (averaged); refused by
    name where its package is missing."""
    from segplan.runner.backend import name as backend_name
    engine = plan.inference.engine
    why = missing(engine, backend_name())
    if why:
        raise EngineMissing(why)
    if engine == "keras":
        return keras_predictor(models)
    paths = onnx_files(plan, models, weights, folds)
    return onnxruntime_predictor(paths) if engine == "onnxruntime" else openvino_predictor(paths)
