#!/usr/bin/env bash
# Every stage on CUDA in one call (at most 8 minutes on one GPU): one table of stage, seconds, peak GPU memory and
# a check of each result. `bash bench/gpu_check.sh --device cpu` runs the same stages on the CPU with small sizes.
#
# A lent GPU machine is bare: its image lacks deepspeed, datasets, lap and gguf, and ../shared does not travel.
# Prepare once on this side (the registries are reachable here, not there):
#   bash bench/gpu_check.sh --prepare    # wheels for its Python 3.12 into .whl/, the data into .gpu_data/ (ignored)
# then run it there with carry [".whl", ".gpu_data"]: `bash bench/gpu_check.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--prepare" ]]; then
    mkdir -p .whl .gpu_data
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
        datasets dill multiprocess lap gguf hjson pydantic pydantic-core annotated-types typing-inspection
    deepspeed_version=$(python3 -m pip show deepspeed | sed -n 's/^Version: //p')
    python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==$deepspeed_version"  # sdist only
    cp ../shared/data/SFT_aligned_llama2-7b-chat-hf_train_short.csv ../shared/data/advbench.txt .gpu_data/
    du -sh .whl .gpu_data
    exit 0
fi
if [[ -d .whl ]] && ! python3 -c "import deepspeed, datasets" 2>/dev/null; then  # a bare machine
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 480 python3 bench/gpu_check.py "$@"
