"""Everything that depends on Keras' backend, in one place. The model, loss, training step,
checkpoints and inference are plain Keras (``keras.ops``) and run on TensorFlow, JAX or PyTorch;
TensorFlow-only extras (MirroredStrategy over several GPUs, TensorBoard logs) are used when the
backend is TensorFlow and skipped otherwise, so nothing else in segplan imports TensorFlow."""
from __future__ import annotations

import contextlib
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


def distribution_scope():
    """TensorFlow's MirroredStrategy when it sees several GPUs (the batch is split across them);
    otherwise a no-op context."""
    if name() != "tensorflow":
        return contextlib.nullcontext()
    import tensorflow as tf
    gpus = tf.config.list_physical_devices("GPU")
    return (tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()).scope()


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
