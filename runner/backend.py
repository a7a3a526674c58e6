"""Everything that depends on Keras' backend, in one place. The model, loss, training step,
checkpoints and inference are plain Keras (``keras.ops``) and run on TensorFlow, JAX or PyTorch;
the TensorFlow-only extra (TensorBoard logs) is used when the backend is TensorFlow and skipped
otherwise, so nothing else in segplan imports TensorFlow.

Training uses one device. Keras 3's ``train_on_batch`` under TensorFlow's MirroredStrategy gives
every replica the whole batch instead of a share (and ``predict_on_batch`` returns one copy of the
output per replica): tested on two logical CPU devices, it computes the same step at twice the cost
and broke validation. Several GPUs are used as one fold per GPU (CUDA_VISIBLE_DEVICES) until the
step distributes its data itself."""
from __future__ import annotations

import contextlib
import math
import os
import sys
from pathlib import Path


@contextlib.contextmanager
def muted_stderr():
    """Silence file descriptor 2 for a block (C++ libraries write there directly, past Python)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def load_quietly() -> None:
    """Import Keras (TensorFlow with it) and let TensorFlow find its devices with stderr muted: its
    start-up notices (oneDNN, CUDA stubs, "failed call to cuInit" on a machine without a GPU) are
    written before its logging is set up, where TF_CPP_MIN_LOG_LEVEL does not reach them. An import
    error still raises, after stderr is back."""
    with muted_stderr():
        import keras
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf
            tf.config.list_physical_devices()


def name() -> str:
    import keras
    return keras.backend.backend()


def has_gpu() -> bool:
    backend = name()
    if backend == "tensorflow":
        import tensorflow as tf
        return bool(tf.config.list_physical_devices("GPU"))
    if backend == "torch":
        import torch
        return torch.cuda.is_available()
    if backend == "jax":
        import jax
        return jax.default_backend() == "gpu"
    return False


def mixed_policy() -> str:
    """float16 with loss scaling on a GPU; bfloat16 on a CPU (no loss scaling needed)."""
    return "mixed_float16" if has_gpu() else "mixed_bfloat16"


def metrics_writer(path: Path):
    """A TensorBoard writer on TensorFlow; None (no TensorBoard logs) on other backends."""
    if name() != "tensorflow":
        return None
    import tensorflow as tf
    return tf.summary.create_file_writer(str(path))


def log_scalars(writer, row: dict) -> None:
    if writer is None:
        return
    import tensorflow as tf
    with writer.as_default():
        for k, v in row.items():
            if k != "epoch" and not (isinstance(v, float) and math.isnan(v)):
                tf.summary.scalar(k, v, step=row["epoch"])
    writer.flush()


def accelerator_peak_gb() -> float | None:
    """The backend's own peak of GPU memory held by this process so far (GiB), None without a GPU:
    PyTorch's reserved peak (what its caching allocator took from the card), JAX's
    ``peak_bytes_in_use``, TensorFlow's ``get_memory_info`` peak."""
    if not has_gpu():
        return None
    backend = name()
    if backend == "torch":
        import torch
        return torch.cuda.max_memory_reserved() / 1024 ** 3
    if backend == "jax":
        import jax
        return jax.devices()[0].memory_stats()["peak_bytes_in_use"] / 1024 ** 3
    import tensorflow as tf
    return tf.config.experimental.get_memory_info("GPU:0")["peak"] / 1024 ** 3


def is_out_of_memory(error: BaseException) -> bool:
    """Whether an exception is the backend running out of device memory (each words it its own way)."""
    text = f"{type(error).__name__}: {error}".lower()
    return any(s in text for s in ("out of memory", "resource_exhausted", "resourceexhausted", "oom when allocating"))
