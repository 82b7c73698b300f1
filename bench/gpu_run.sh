#!/usr/bin/env bash
# Runs ON the device (after bench/gpu_prepare.sh here; carry .whl and .gpu). Each part fits one
# 10-minute device call and runs the shared reference in the same call, as RESULTS.md requires:
#   bash bench/gpu_run.sh model   # reference_step + bench/model_step.py 0.9b
#   bash bench/gpu_run.sh train   # reference_step + bench/train_step.py 0.9b (the real trainer)
#   bash bench/gpu_run.sh tests   # the `gpu` tests (flex = sdpa on CUDA; a bf16 compiled run resumed)
#   bash bench/gpu_run.sh sample  # bench/sample_speed.py at GPU sizes
#   bash bench/gpu_run.sh overhead  # reference_step + bench/overhead.py (the trainer's step against a bare loop)
# SMOKE=1 runs the same steps at CPU sizes (check the script here before spending device time).
set -uo pipefail
part=${1:?usage: gpu_run.sh model|train|tests|sample|overhead}
if [[ ${SMOKE:-0} == 1 ]]; then ref=(--tiny); model=(--preset tiny); train=(--preset tiny-cpu); sample=(--dim 64 --layers 2 --latent 8)
  overhead=(--presets tiny-cpu --kinds text --rounds 1 --steps 2)
else ref=(); model=(--preset 0.9b --compile); train=(--preset 0.9b --compile); sample=(--dim 2048 --layers 16 --latent 32)
  overhead=(--presets 0.9b-2k,0.9b --rounds 3 --steps 5); fi
out=${OUT:-/tmp/gpu-out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 DS_ACCELERATOR=$([[ ${SMOKE:-0} == 1 ]] && echo cpu || echo cuda)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$out/device.txt"
python3 -c "import torch, deepspeed, diffusers; print(torch.__version__, deepspeed.__version__, diffusers.__version__)" \
    | tee -a "$out/device.txt"
case $part in
  model)
    python3 .gpu/reference_step.py "${ref[@]}" 2>&1 | tee "$out/reference.txt"
    python3 bench/model_step.py "${model[@]}" --steps 10 2>&1 | tee "$out/model_step.txt" ;;
  tests)
    python3 -m pytest -q -m gpu tests/ 2>&1 | tee "$out/gpu_tests.txt" ;;
  train)
    python3 .gpu/reference_step.py "${ref[@]}" 2>&1 | tee "$out/reference.txt"
    python3 bench/train_step.py "${train[@]}" --steps 10 2>&1 | tee "$out/train_step.txt" ;;
  sample)
    python3 bench/sample_speed.py "${sample[@]}" --steps 20 2>&1 | tee "$out/sample_speed.txt" ;;
  overhead)
    python3 .gpu/reference_step.py "${ref[@]}" 2>&1 | tee "$out/reference.txt"
    python3 bench/overhead.py "${overhead[@]}" 2>&1 | tee "$out/overhead.txt" ;;
  *) echo "unknown part $part"; exit 2 ;;
esac
