#!/usr/bin/env bash
# One short GPU check (issue 15), for a machine with python3, CUDA torch and jax, numpy, scipy, pyyaml
# and tqdm but no TensorFlow and no internet: keras and its two missing dependencies come as wheels
# in .whl/ (git-ignored; README "Measured on a GPU" gives the download command). Writes its figures
# under ${OUT:-benchmarks/results}/. About 4 minutes on an H200.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
# the whole grid and one paper-sized prediction under PyTorch (its peak is reset per point)
KERAS_BACKEND=torch timeout 300 python3 benchmarks/gpu_memory.py --grid full --out "$out/gpu_memory_torch.json" \
  2>&1 | tee "$out/gpu_memory_torch.log"
# the paper's network under JAX, one point per process (its peak cannot be reset)
for g in paper_f32 paper_bf16; do
  XLA_PYTHON_CLIENT_PREALLOCATE=false KERAS_BACKEND=jax timeout 120 python3 benchmarks/gpu_memory.py --grid $g \
    --no-window --out "$out/gpu_memory_jax_$g.json" 2>&1 | tail -3 | tee -a "$out/gpu_memory_jax.log"
done
