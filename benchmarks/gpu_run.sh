#!/usr/bin/env bash
# The H200 check in one command (about 7 minutes): the kernel and op tests on the GPU, the layer
# benchmarks against cuDNN, then the DP-SGD step against Opacus' GroupNorm fix.
# Writes $OUT/gpu_run.json, $OUT/gpu_tests.log, $OUT/dp_sgd_cuda.{json,md} and $OUT/gpu_run.log
# (OUT defaults to benchmarks/results).
#
# A machine without opacus takes its wheel from .whl/ (benchmarks/README.md); the package
# itself is installed with --no-deps, so the machine's own torch and triton are the ones measured.
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT="${OUT:-benchmarks/results}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . \
    || export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    timeout 400 python3 benchmarks/gpu_run.py --budget-s 120 --tests-timeout-s 240 "$@"
    status=$?
    timeout 60 python3 benchmarks/bench_dp_sgd.py --device cuda --batch 256 --steps 20 --out "$OUT"
    exit $status
} 2>&1 | tee "$OUT/gpu_run.log"
