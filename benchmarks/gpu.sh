#!/usr/bin/env bash
# Every GPU check and benchmark in one command, on a machine with an NVIDIA GPU and a CUDA torch:
# builds the native kernels (CUDA included), runs the CUDA tests, and writes
# benchmarks/results/{kernels_cuda,kernels_cuda_bf16,scoring_cuda,gpu_decode_cuda}.md naming the device.
#   bash benchmarks/gpu.sh [RESULTS_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results}
mkdir -p "$out"
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$python" setup.py -q build_ext --inplace || exit 1
"$python" -m pytest tests/test_kernels_cuda.py tests/test_scoring_cuda.py -q -p no:cacheprovider 2>&1 | tee "$out/tests_cuda.log" \
  || echo "gpu.sh: CUDA tests FAILED (see $out/tests_cuda.log); benchmarks follow" >&2
"$python" benchmarks/kernels.py --device cuda --out "$out/kernels_cuda.md"
"$python" benchmarks/kernels.py --device cuda --dtype bfloat16 --out "$out/kernels_cuda_bf16.md"
"$python" benchmarks/scoring_gpu.py --out "$out/scoring_cuda.md"
"$python" benchmarks/gpu_decode.py --out "$out/gpu_decode_cuda.md"
