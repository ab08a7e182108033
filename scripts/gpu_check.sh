#!/usr/bin/env bash
# One GPU check in one call: build _C with its CUDA kernels (sm_90 by default), run every test that
# needs a GPU (CUDA and Triton backends against the reference), a short demo on the GPU, and the
# benchmark suite with --device cuda. Logs and the bench JSON/markdown/PNG go to $OUT (default
# ./gpu-out). Meant for a machine with torch + nvcc already installed (e.g. the lent H100/H200);
# missing pure-Python packages can sit as wheels in .whl/.
#   bash scripts/gpu_check.sh [--full]      (--full: full bench instead of --quick)
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
MODE=--quick
[ "${1:-}" = "--full" ] && MODE=

if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

t0=$(date +%s)
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} GUIDG_FAST_CUDA=1
if ! python3 -m pip install --no-build-isolation --no-deps --no-cache-dir . >"$OUT/build.log" 2>&1; then
    tail -40 "$OUT/build.log"; exit 1
fi
echo "build: $(( $(date +%s) - t0 )) s"
cd /tmp  # import the installed package, not the source tree
python3 -m guidg_fast info | tee "$OUT/info.txt"
cd - >/dev/null

t0=$(date +%s)
# -P: do not put the repository root on sys.path (tests import the installed package)
GUIDG_FAST_REQUIRE_EXT=1 timeout ${TEST_TIMEOUT:-240} python3 -P -m pytest tests -q -p no:cacheprovider -k "cuda" \
    -rs 2>&1 | tee "$OUT/pytest-cuda.log" | tail -25
echo "cuda tests: $(( $(date +%s) - t0 )) s"

if [ "${DEMO_TIMEOUT:-120}" != 0 ]; then  # DEMO_TIMEOUT=0 skips the demo
    t0=$(date +%s)
    timeout ${DEMO_TIMEOUT:-120} python3 -P -m guidg_fast demo --device cuda --out /tmp/demo-run >"$OUT/demo.log" 2>&1
    echo "demo rc=$? ($(( $(date +%s) - t0 )) s)"; grep -iE "accuracy|faster|target|expert|ensemble" "$OUT/demo.log" | tail -15
fi

t0=$(date +%s)
# BENCH_ONLY="cmattn multi_expert_loss" runs only those entries
timeout ${BENCH_TIMEOUT:-240} python3 -P -m guidg_fast bench --device cuda $MODE ${BENCH_ONLY:+--only $BENCH_ONLY} \
    --out "$OUT" >"$OUT/bench.log" 2>&1
echo "bench rc=$? ($(( $(date +%s) - t0 )) s)"; tail -40 "$OUT/bench.log"
