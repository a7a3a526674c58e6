#!/usr/bin/env bash
# One short GPU check (issue 15), for a machine with python3, CUDA torch and jax, numpy, scipy, pyyaml
# and tqdm but no TensorFlow and no internet. Brought along in .whl/ (git-ignored, README "Measured on
# a GPU" says how to fill it): keras and the small wheels, SimpleITK as simpleitk.tar.xz (its wheel is
# 51 MB, xz makes it 28), the Hippocampus dataset as hippocampus.tar.xz (its .nii files, 14 MB), and
# for sidebyside nnU-Net v2's wheels (docs/gpus-and-backends.md lists them).
#   benchmarks/gpu_check.sh [grid] [probe] [hippocampus] [sidebyside]   (no argument: the first three)
# grid: the memory model's calibration grid (plain U-Net, deep supervision, residual encoder) and one
# paper-sized prediction (~6 min on an H200);
# probe: `segplan plan --probe` for an 8 GB budget, then that plan trained under an 8 GB cap;
# hippocampus: a 3-minute Hippocampus fold 0 from a GPU plan, evaluated on its 52 validation cases;
# sidebyside: nnU-Net v2 against segplan on that fold, SIDE_MINUTES (default 3) of training each, so
# that both fit one 10-minute call (SIDE_TOOLS=segplan, then SIDE_TOOLS=nnunet: one tool per call).
# Writes its figures under ${OUT:-benchmarks/results}/.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
steps=${*:-grid probe hippocampus}
mkdir -p "$out" /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
[ -f .whl/simpleitk.tar.xz ] && tar xJf .whl/simpleitk.tar.xz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 KERAS_BACKEND=torch
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
for step in $steps; do
  case $step in
  grid)
    # the whole grid and one paper-sized prediction under PyTorch (its peak is reset per point)
    timeout 480 python3 benchmarks/gpu_memory.py --grid full --out "$out/gpu_memory_torch.json" \
      2>&1 | tee "$out/gpu_memory_torch.log"
    # the paper's network under JAX, one point per process (its peak cannot be reset)
    for g in paper_f32 paper_bf16; do
      XLA_PYTHON_CLIENT_PREALLOCATE=false KERAS_BACKEND=jax timeout 120 python3 benchmarks/gpu_memory.py --grid $g \
        --no-window --out "$out/gpu_memory_jax_$g.json" 2>&1 | tail -3 | tee -a "$out/gpu_memory_jax.log"
    done ;;
  probe)
    timeout 240 python3 benchmarks/gpu_fold.py --gpu-memory 8 --epochs 2 --iterations 30 --probe --cap \
      --out "$out/gpu_probe_8gb.json" 2>&1 | grep -v "^\s*$" | tail -40 | tee "$out/gpu_probe_8gb.log" ;;
  hippocampus)
    rm -rf /tmp/hip && mkdir -p /tmp/hip && tar xJf .whl/hippocampus.tar.xz -C /tmp/hip || exit 1
    find /tmp/hip -name '*.nii' -print0 | xargs -0 -P 16 -n 20 gzip -1
    timeout 330 python3 benchmarks/hippocampus_budget.py --device gpu --gpu-memory 8 --minutes 3 --no-best \
      --data /tmp/hip/Dataset004_Hippocampus --work /tmp/hip_work 2>&1 | tail -40 | tee "$out/gpu_hippocampus_3min.log" ;;
  sidebyside)
    if [ ! -d /tmp/hip/Dataset004_Hippocampus ]; then
      mkdir -p /tmp/hip && tar xJf .whl/hippocampus.tar.xz -C /tmp/hip || exit 1
      find /tmp/hip -name '*.nii' -print0 | xargs -0 -P 16 -n 20 gzip -1
    fi
    # nnU-Net compiles its network by default; without Triton it could not, so it is told not to
    compile=; python3 -c "import triton" 2>/dev/null || compile=--no-compile
    m=${SIDE_MINUTES:-3}
    timeout 590 python3 benchmarks/side_by_side.py --device cuda --gpu-memory 8 --minutes "$m" $compile \
      --tools ${SIDE_TOOLS:-segplan nnunet} --data /tmp/hip/Dataset004_Hippocampus --work /tmp/side_by_side \
      --out "$out/side_by_side_${m}min.json" 2>&1 | grep -v "^\s*$" | tail -40 | tee "$out/side_by_side_${m}min.log" ;;
  esac
done
