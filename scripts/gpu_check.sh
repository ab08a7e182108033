#!/usr/bin/env bash
# One GPU check in one call: build _C with its CUDA kernels (sm_90 by default), run every test that
# needs a GPU (CUDA and Triton backends against the reference), optionally a short demo, the
# benchmark entries on the GPU with the default backends, then the step-2 entries again with the
# other backend forced (GUIDG_FAST_BACKEND=triton) so the two GPU backends sit side by side.
# Everything printed goes to $OUT/gpu.log; bench results to $OUT/bench/gpu/ (latest.json, latest.md,
# latest.png, history.jsonl: the committed bench/gpu files with this run's rows merged in and
# appended, written as each case finishes; `cp $OUT/bench/gpu/* bench/gpu/` takes them in): 5
# files. Meant for a machine with torch + nvcc installed (the lent H100/H200); missing pure-Python
# packages can sit as wheels in .whl/.
#   bash scripts/gpu_check.sh [--quick]
# Knobs: TEST_TIMEOUT (s, default 150), DEMO_TIMEOUT (s, 0 = skip, default 0), GUIDG_RUN_TIMEOUT
# (s, 120), BENCH_TIMEOUT (s, 140), BENCH_ONLY (entries of the default-backend run; default all but
# guidg_run), ALT_BACKEND (triton), ALT_ONLY (entries of that run, "" skips it), ALT_TIMEOUT (s, 60).
# Defaults sum to under 9 minutes with the ~40 s build (the GPU session has ~15 in all).
# The bench run includes ddp_scaling: step-2 img/s on 1 rank vs one rank per visible GPU (NCCL).
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
LOG=$OUT/gpu.log
MODE=
[ "${1:-}" = "--quick" ] && MODE=--quick
say() { echo "$@" | tee -a "$LOG"; }
RESULTS=$OUT/bench/gpu
mkdir -p "$RESULTS"
for f in latest.json history.jsonl; do [ -f bench/gpu/$f ] && [ ! -f "$RESULTS/$f" ] && cp bench/gpu/$f "$RESULTS/"; done

if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader 2>&1 | tee -a "$LOG"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$LOG"

t0=$(date +%s)
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} GUIDG_FAST_CUDA=1
if ! python3 -m pip install --no-build-isolation --no-deps --no-cache-dir . >/tmp/build.log 2>&1; then
    tail -60 /tmp/build.log | tee -a "$LOG"; exit 1
fi
say "build: $(( $(date +%s) - t0 )) s"
cd /tmp  # import the installed package, not the source tree
python3 -m guidg_fast info 2>&1 | tee -a "$LOG"
cd - >/dev/null

# A C++ exception from _C (TORCH_CHECK in a kernel) must reach Python as an error: on the H200's
# torch 2.11 image (2026-11-26) the first one segfaulted the process (tests/test_cmattn.py::
# test_cpu_kernels_reject_other_q_strides), where torch 2.14 here raises. Checked first, alone.
SMOKE="
import torch, guidg_fast
try:
    guidg_fast.ops._backend.load_extension().cmattn_forward(torch.randn(4, 3, 8).transpose(0, 1), torch.randn(2, 4, 8), True)
    print('C++ exception path: NO ERROR RAISED')
except RuntimeError as e:
    print('C++ exception path: ok (RuntimeError raised)')
"
python3 -P -X faulthandler -c "$SMOKE" 2>&1 | tail -12 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
say "C++ exception path exit status: $rc (139 = segfault)"
if [ "$rc" != 0 ]; then
    # which frame: without torch's C++ stack capture / symbolisation, then a native backtrace
    TORCH_SHOW_CPP_STACKTRACES=0 TORCH_DISABLE_ADDR2LINE=1 python3 -P -c "$SMOKE" 2>&1 | tail -3 | tee -a "$LOG"
    say "  again without C++ stack traces: exit ${PIPESTATUS[0]}"
    if command -v gdb >/dev/null; then
        timeout 120 gdb -q -batch -ex run -ex bt --args python3 -P -c "$SMOKE" 2>&1 \
            | grep -vE "^\[(New|Thread)" | tail -60 | tee -a "$LOG"
    fi
    ldd "$(python3 -P -c 'import guidg_fast._C as c; print(c.__file__)')" 2>&1 | tee -a "$LOG"
    g++ --version | head -1 | tee -a "$LOG"
fi

t0=$(date +%s)
# -P: do not put the repository root on sys.path (tests import the installed package)
GUIDG_FAST_REQUIRE_EXT=1 timeout ${TEST_TIMEOUT:-150} python3 -P -m pytest tests -q -p no:cacheprovider -k "cuda" \
    -rs 2>&1 | tee -a "$LOG" | tail -25
say "cuda tests: $(( $(date +%s) - t0 )) s"

if [ "${DEMO_TIMEOUT:-0}" != 0 ]; then
    t0=$(date +%s)
    timeout ${DEMO_TIMEOUT} python3 -P -m guidg_fast demo --device cuda --out /tmp/demo-run >/tmp/demo.log 2>&1
    say "demo rc=$? ($(( $(date +%s) - t0 )) s)"; grep -iE "accuracy|faster|target|expert|ensemble" /tmp/demo.log | tail -15 | tee -a "$LOG"
fi

# the whole-run entry first (official loops vs the trainer, bf16 fast / fp16 autocast official),
# on its own clock; its JPEG folders go to /tmp (not $OUT)
t0=$(date +%s)
GUIDG_FAST_BENCH_DATA=/tmp/bench-data timeout ${GUIDG_RUN_TIMEOUT:-120} python3 -P -m guidg_fast bench --device cuda $MODE \
    --only guidg_run --out "$RESULTS" 2>&1 | tee -a "$LOG" | tail -30
say "guidg_run rc=${PIPESTATUS[0]} ($(( $(date +%s) - t0 )) s)"

BENCH_ONLY=${BENCH_ONLY:-$(python3 -P -c "from guidg_fast.bench.run import entry_names; print(' '.join(n for n in entry_names() if n != 'guidg_run'))")}
t0=$(date +%s)
timeout ${BENCH_TIMEOUT:-140} python3 -P -m guidg_fast bench --device cuda $MODE ${BENCH_ONLY:+--only $BENCH_ONLY} \
    --out "$RESULTS" 2>&1 | tee -a "$LOG" | tail -40
say "bench rc=${PIPESTATUS[0]} ($(( $(date +%s) - t0 )) s)"

# the other GPU backend beside the default (ext) one, same lease: rows marked forced_backend
ALT_BACKEND=${ALT_BACKEND:-triton}
ALT_ONLY=${ALT_ONLY-cmattn_loss cmattn multi_expert_loss}
if [ -n "$ALT_ONLY" ]; then
    t0=$(date +%s)
    GUIDG_FAST_BACKEND=$ALT_BACKEND timeout ${ALT_TIMEOUT:-60} python3 -P -m guidg_fast bench --device cuda $MODE \
        --only $ALT_ONLY --out "$RESULTS" 2>&1 | tee -a "$LOG" | tail -30
    say "$ALT_BACKEND bench rc=${PIPESTATUS[0]} ($(( $(date +%s) - t0 )) s)"
fi
