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

import math
from pathlib import Path


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
