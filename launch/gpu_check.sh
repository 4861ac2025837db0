#!/usr/bin/env bash
# GPU readiness check, under 8 minutes on one GPU machine: the `gpu`-marked tests (NCCL group,
# bf16 autocast, pynvml readings), then a short training-throughput run, DDP vs DeepSpeed
# ZeRO-2 with the ResNet-50 saliency network at 352 px (benchmarks/gpu_throughput.py).
# Without a CUDA device it prints one line and exits 0. Arguments go to the benchmark:
#   launch/gpu_check.sh
#   launch/gpu_check.sh --steps 100 --batch 24 --json gpu.json
set -euo pipefail
REPO_ROOT="${JSM_REPO_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
cd "$REPO_ROOT"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$REPO_ROOT/.venv/bin/python" ]; then PYTHON="$REPO_ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
TEST_TIMEOUT="${TEST_TIMEOUT:-180}"    # seconds for the gpu-marked tests
BENCH_TIMEOUT="${BENCH_TIMEOUT:-270}"  # seconds for the throughput run (packing included)
export PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}"

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA device visible to torch (torch.cuda.is_available() is False): nothing to check"
  exit 0
fi
echo "[gpu_check] gpu-marked tests"
timeout "$TEST_TIMEOUT" "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider tests/unit/test_gpu.py
echo "[gpu_check] throughput: DDP vs DeepSpeed ZeRO-2"
timeout "$BENCH_TIMEOUT" "$PYTHON" -m benchmarks.gpu_throughput "$@"
