#!/usr/bin/env bash
# Creates .venv (if missing) with everything guidg-fast needs, and builds + installs the package
# (non-editable) with its C++/CUDA extension. Needs only python3 (>= 3.10); safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, pinned to the build this project is tested with; then the rest of the dependencies
python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
python -m pip install -q "triton>=3.0" "open_clip_torch>=2.24" safetensors numpy tqdm pybind11 ninja \
  "setuptools>=64" wheel pytest pytest-benchmark matplotlib
# --no-build-isolation: build the extension against the torch installed above
MAX_JOBS=${MAX_JOBS:-2} python -m pip install -q --no-build-isolation .
