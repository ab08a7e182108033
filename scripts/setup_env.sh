#!/usr/bin/env bash
# Creates .venv (if missing) with everything guidg-fast needs, and builds + installs the package
# (non-editable) with its C++/CUDA extension. Needs only python3 (>= 3.10); safe to run again (an
# existing .venv is reused: only the package is rebuilt).
#
# The first install takes ~6 minutes on an idle 2-core box (16 on a busy one), most of it nvcc: the CUDA objects are compiled
# whenever torch has CUDA and nvcc is found, also on a machine without a GPU (GUIDG_FAST_CUDA=0 skips
# them: a few minutes; TORCH_CUDA_ARCH_LIST picks the architectures, default "8.0;9.0").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
t0=$(date +%s)
stage() { echo "[setup_env +$(( $(date +%s) - t0 ))s] $*"; }

if [[ ! -x .venv/bin/python ]]; then
  stage "creating .venv with $($PY --version 2>&1)"
  "$PY" -m venv .venv
else
  stage "reusing the existing .venv"
fi
. .venv/bin/activate
stage "upgrading pip"
python -m pip install -q --upgrade pip
# torch first, pinned to the build this project is tested with; then the rest of the dependencies
stage "installing torch 2.14.1 + torchvision 0.29.1 (~2 min when not installed yet)"
python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
stage "installing the other dependencies (triton, open_clip_torch, safetensors, pytest, ...)"
python -m pip install -q "triton>=3.0" "open_clip_torch>=2.24" safetensors numpy tqdm pybind11 ninja \
  "setuptools>=64" wheel pytest pytest-benchmark matplotlib

cuda_note="CPU kernels only"
if [[ "${GUIDG_FAST_CUDA:-}" != "0" ]] && python -c "import torch, sys; sys.exit(torch.version.cuda is None)" \
   && { [[ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]] || command -v nvcc >/dev/null; }; then
  cuda_note="CPU kernels + CUDA kernels for TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0} (nvcc: the long part)"
fi
stage "building guidg_fast._C: $cuda_note; compiler progress below"
mkdir -p build
log=build/setup_env.log
# --no-build-isolation: build the extension against the torch installed above. -v shows ninja's
# "[i/n] <compile command>" lines; only the step and the source file are printed here, the whole
# output goes to build/setup_env.log
set +e
MAX_JOBS=${MAX_JOBS:-2} python -m pip install -v --no-build-isolation . 2>&1 | tee "$log" \
  | grep --line-buffered -oE '^ *\[[0-9]+/[0-9]+\] .*' | sed -u 's/^ *//' \
  | sed -u -E 's#^(\[[0-9]+/[0-9]+\]).* -c ([^ ]*/)?(csrc/[^ ]+\.(cpp|cu)).*#  \1 compiling \3#; s#^(\[[0-9]+/[0-9]+\]) ([^ ]*/)?(c\+\+|g\+\+|x86_64-linux-gnu-g\+\+) .*#  \1 linking guidg_fast._C#'
rc=${PIPESTATUS[0]}
set -e
if [[ $rc -ne 0 ]]; then
  echo "building guidg_fast failed (exit $rc); the last lines of $log:" >&2
  tail -n 60 "$log" >&2
  exit $rc
fi
stage "done: $(python -P -c 'import guidg_fast, guidg_fast.ops as o; s = o.extension_status(); print("guidg_fast", guidg_fast.__version__, "with _C built," if s["built"] else "WITHOUT _C,", "CUDA kernels," if s["with_cuda"] else "no CUDA kernels,", "CPU loops", s["cpu_isa"])' 2>&1 | tail -1)"
