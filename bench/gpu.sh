#!/usr/bin/env bash
# Paper-scale GPU throughput, FLOPs and MFU of the project's adapters (bench/gpu.py) on a lent GPU machine: no network
# there, and no diffusers or pydantic (what cyclepref.config / the text-to-image adapter import), so they travel as
# wheels in .whl/ (ignored by git; 8.9 MB). Prepare them here, once, from the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     diffusers==0.42.1 importlib_metadata==8.7.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.8.0 \
#     typing_inspection==0.4.5 typing_extensions==4.16.0
# then run it there with `.whl` carried:  bash bench/gpu.sh
# Not needed there: open_clip, trl, dvc, mlflow, prefect (nothing the bench runs imports them); sentence-transformers,
# transformers, accelerate, safetensors, pyarrow, PyYAML, Pillow and torchvision are on the machine already.
# Time: BUDGET_S (default 390 s) for the measurements, a hard stop 50 s after it; with the wheel install and the
# imports the script ends within 8 minutes. It prints one table and writes gpu_results.json (rewritten after every
# row, so a run cut short keeps its rows) and gpu_table.txt into $OUT (or bench/ when OUT is unset).
# Then, here: python bench/paper_cost.py --results <that gpu_results.json> --write-readme
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null && ! python3 -c "import diffusers, pydantic" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_DISABLE_TELEMETRY=1 DO_NOT_TRACK=1 HF_HUB_DISABLE_PROGRESS_BARS=1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
out="${OUT:-bench}"
budget="${BUDGET_S:-390}"
timeout -k 5 "$((${budget%.*} + 50))" python3 bench/gpu.py --budget-s "$budget" --out "$out/gpu_results.json" "$@" \
  > "$out/gpu_log.txt" 2>&1
rc=$?
grep -v -e "^Loading pipeline components" -e "truncated because CLIP" -e "should be kept in float32" \
  "$out/gpu_log.txt" | tail -n 200
if [ "$rc" -ne 0 ] && [ -f "$out/gpu_results.json" ]; then
  echo "bench/gpu.py ended with status $rc; the rows it measured:"
  python3 bench/gpu.py --print "$out/gpu_results.json"
fi
[ -f "$out/gpu_results.json" ] && python3 bench/gpu.py --print "$out/gpu_results.json" > "$out/gpu_table.txt"
exit "$rc"
