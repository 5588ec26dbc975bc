#!/usr/bin/env bash
# Paper-scale GPU throughput (bench/gpu.py) on a lent GPU machine: no network there, and no diffusers, so diffusers
# travels as wheels in .whl/ (ignored by git). Prepare them here, once, from the repository root:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 importlib_metadata==8.7.0 zipp==3.23.0
# then run it there with `.whl` carried:  bash bench/gpu.sh   (about 8 minutes; BUDGET_S=450 by default).
# It prints one table and writes gpu_results.json and gpu_table.txt into $OUT (or bench/ when OUT is unset).
# Without the wheels, the UNet and SD3 rows are reported as skipped and the other rows still run.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import diffusers" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
out="${OUT:-bench}"
python3 bench/gpu.py --budget-s "${BUDGET_S:-450}" --out "$out/gpu_results.json" "$@" 2>&1 | tee "$out/gpu_table.txt"
