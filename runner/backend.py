"""Everything that depends on Keras' backend, in one place. The model, loss, training step,
checkpoints and inference are plain Keras (``keras.ops``) and run on TensorFlow, JAX or PyTorch;
the TensorFlow-only extra (TensorBoard logs) is used when the backend is TensorFlow and skipped
otherwise, so nothing else in segplan imports TensorFlow.

Several devices train one fold through Keras' distribution API (``keras.distribution.DataParallel``,
JAX backend): each device computes its share of the global batch and the gradients are combined
(``segplan run --data-parallel``). Keras 3's ``train_on_batch`` under TensorFlow's MirroredStrategy
instead gives every replica the whole batch (and ``predict_on_batch`` one copy of the output per
replica): tested on two logical CPU devices, it computed the same step at twice the cost, so it is
not used; on TensorFlow or PyTorch several GPUs train one fold each."""
from __future__ import annotations

import contextlib
import math
import os
import platform
import sys
from pathlib import Path


ONEDNN = "TF_ENABLE_ONEDNN_OPTS"


def prefer_onednn(environ=None, modules=None, machine: str | None = None) -> str:
    """Turn TensorFlow's oneDNN CPU kernels on before TensorFlow is imported (x86-64 CPUs); returns
    what was done.

    Since 2.9 TensorFlow enables them by default only on CPUs with AVX-512 neural-network features
    (AVX512_VNNI, AVX512_BF16, AMX) and leaves them off elsewhere: on an AVX2 CPU (AMD EPYC Rome or
    Milan, older Intel) a training step of a CPU plan then takes 3-5x longer (docs/benchmarks.md,
    "oneDNN"). On GPUs it changes nothing. A user's own ``TF_ENABLE_ONEDNN_OPTS`` (0 or 1) wins; once
    TensorFlow is imported the choice is made, and nothing is changed. On other processors (ARM:
    Graviton, Apple silicon) TensorFlow's own default stands: nothing was measured there. segplan
    calls this when it is imported (``segplan/__init__.py``), before any of its code can import
    TensorFlow, so that every command, worker process, probe and SLURM job (which inherit the
    environment) runs with it."""
    environ = os.environ if environ is None else environ
    modules = sys.modules if modules is None else modules
    if ONEDNN in environ:
        return f"left as the user set it ({ONEDNN}={environ[ONEDNN]})"
    if "tensorflow" in modules:
        return "TensorFlow was imported before segplan: its own default holds"
    if (machine if machine is not None else platform.machine()).lower() not in ("x86_64", "amd64"):
        return "not an x86-64 CPU: TensorFlow's own default holds"
    environ[ONEDNN] = "1"
    return f"turned on ({ONEDNN}=1)"


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


@contextlib.contextmanager
def distributed(batch_size: int, enabled: bool, validation_patches: int = 0):
    """Within the block, with ``enabled``: the global batch split over every local device along its
    first axis (weights replicated), via ``keras.distribution.DataParallel`` (JAX backend only:
    Keras' distribution API). Prints what it does; the distribution is unset after the block, so
    prediction runs on one device as usual."""
    if not enabled:
        yield
        return
    if name() != "jax":
        raise ValueError(f"--data-parallel needs KERAS_BACKEND=jax (Keras' distribution API); on {name()} run "
                         "one fold per GPU instead (docs/gpus-and-backends.md)")
    import keras
    devices = keras.distribution.list_devices()
    if batch_size % len(devices):
        raise ValueError(f"training.batch_size {batch_size} does not split evenly over {len(devices)} devices")
    if validation_patches % batch_size:
        raise ValueError(f"training.schedule.validation_patches {validation_patches} is not a multiple of "
                         f"training.batch_size {batch_size}: its last batch would not split over the devices")
    dist = keras.distribution.DataParallel(devices=devices)
    axis = dist.get_data_layout((batch_size, 1)).axes[0]
    print(f"data parallel: batch {batch_size} split along '{axis}' over {len(devices)} devices "
          f"({batch_size // len(devices)} samples each: {', '.join(devices)})")
    keras.distribution.set_distribution(dist)
    try:
        yield
    finally:
        keras.distribution.set_distribution(None)
