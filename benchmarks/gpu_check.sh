#!/usr/bin/env bash
# One command on one GPU (< 8 minutes): the CUDA-vs-CPU-float64 tests (pytest -m gpu), then
# top-5 Hessian eigenvalues of a ResNet-50-sized CNN and a GPT-2-small-sized LM with wall time,
# products and peak GPU memory.   Usage: bash benchmarks/gpu_check.sh [python]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python}
export PYTHONPATH=$PWD
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"
"$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"
timeout 240 "$PY" -m pytest -m gpu tests/test_gpu.py -q
timeout 300 "$PY" benchmarks/gpu_check.py --k 5 --max-iter 100
