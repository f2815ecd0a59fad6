#!/usr/bin/env bash
# The H200 check of issue 4 in one command (about 5 minutes): GPU tests, then the benchmarks.
# Writes $OUT/gpu_run.json (OUT defaults to benchmarks/results).
set -euo pipefail
cd "$(dirname "$0")/.."
export OUT="${OUT:-benchmarks/results}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
exec timeout 420 python benchmarks/gpu_run.py --budget-s 270 "$@"
