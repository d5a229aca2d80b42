#!/usr/bin/env bash
# Every stage on CUDA in one call (at most 8 minutes on one GPU): one table of stage, seconds, peak GPU memory and
# a check of each result. `bash bench/gpu_check.sh --device cpu` runs the same stages on the CPU with small sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout 480 python3 bench/gpu_check.py "$@"
