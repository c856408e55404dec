#!/usr/bin/env bash
# One-shot GPU run: build the extension in place, run the GPU tests, run the full
# benchmark suite on CUDA, and print a short summary table last.
#
#   benchmarks/gpu_run.sh OUTDIR [--dry-run]
#
# For a fresh machine with CUDA, torch and Triton installed and no network
# (nothing is downloaded or pip-installed).  Everything lands in OUTDIR:
#   build.log, info.txt, pytest_gpu.log, bench.log, bench-cuda-full-*.json/.png, summary.txt
# Budget: the whole script fits in 8 minutes on an H200 (each step has a timeout;
# the benchmark gets what is left via --max-minutes).  It stops at the first broken
# step with a non-zero exit and says which step and where its log is.
#
# Environment:
#   PYTHON=python          interpreter to use
#   FASTPEFT_CUDA_ARCHS    compute capabilities to build (default: this GPU's, e.g. 90)
#   TOTAL_BUDGET_S=470     seconds for the whole script (bench gets the rest)
#   KEEP_GOING=1           run the benchmark even if the GPU tests fail (exit non-zero at the end)
#   SKIP_BUILD=1           use the extension already built in place
#   GPU_RUN_DEVICE=cpu     rehearse the script on a CPU machine (smoke suite, no CUDA checks)
#   GPU_TEST_WORKERS=8     pytest-xdist processes for the GPU tests (when xdist is installed)
#   FASTPEFT_TRITON_AUTOTUNE  configs the benchmark autotunes over: quick (default here), full, off;
#                          the GPU tests always run with off (see README "Backends")
#   WHEELS_DIR=benchmarks/wheels  wheels to install offline first (--no-deps): liger-kernel (the GPU peer of
#                          the decoder ops) and bitsandbytes (the QLoRA tests and nf4 cases skip without it);
#                          the device image has neither (git-ignored, 44 MB for both: carry it)
#   FASTPEFT_GIT_COMMIT    the commit to record in the JSON (a copied working tree may hold a stale .git)
#
# Measured on the first H200 run (2026-12-04): build 27 s (MAX_JOBS=16), GPU tests 106 s with 8 xdist
# workers (Triton compiles dominate), full benchmark > 6 min; cases carrying targets now run first, so a cap
# cuts the untargeted shapes.  Start-up of the leased machine (~60 s) is not in TOTAL_BUDGET_S.
set -euo pipefail

usage() { echo "usage: $0 OUTDIR [--dry-run]" >&2; exit 2; }
[[ $# -ge 1 && $# -le 2 ]] || usage
OUTDIR=$1
DRY=0
if [[ $# -eq 2 ]]; then [[ $2 == --dry-run ]] || usage; DRY=1; fi

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python}
DEVICE=${GPU_RUN_DEVICE:-cuda}
SUITE=full; [[ $DEVICE == cpu ]] && SUITE=smoke
TOTAL=${TOTAL_BUDGET_S:-470}
START=$(date +%s)
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
FAILED_STEPS=()
STEP=""

say() { printf '\n=== [%3ss] %s\n' "$(( $(date +%s) - START ))" "$*"; }
on_error() {
  local rc=$?
  echo "" >&2
  echo "gpu_run.sh: FAILED at step '$STEP' (exit $rc); see its log in $OUTDIR" >&2
  exit "$rc"
}
trap on_error ERR

# step NAME TIMEOUT_S LOG -- CMD...   (runs CMD with a timeout, output to the terminal and LOG)
step() {
  STEP=$1; local limit=$2 log=$3; shift 4
  say "$STEP (timeout ${limit}s, log $log)"
  echo "+ $*"
  if [[ $DRY == 1 ]]; then return 0; fi
  local rc=0
  timeout --signal=TERM --kill-after=10 "$limit" "$@" > >(tee "$OUTDIR/$log") 2>&1 || rc=$?
  wait
  if [[ $rc -ne 0 ]]; then
    [[ $rc -eq 124 ]] && echo "gpu_run.sh: step '$STEP' ran past its ${limit}s timeout" >&2
    return "$rc"
  fi
}

# 0. the machine
if [[ $DEVICE == cuda ]]; then
  step "check CUDA" 60 check.log -- "$PY" -c "
import torch, sys
assert torch.cuda.is_available(), 'torch.cuda.is_available() is False: no usable GPU'
print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0))"
  if [[ -z ${FASTPEFT_CUDA_ARCHS:-} && $DRY == 0 ]]; then
    FASTPEFT_CUDA_ARCHS=$("$PY" -c "import torch; m, n = torch.cuda.get_device_capability(0); print(f'{m}{n}')")
  fi
  export FASTPEFT_CUDA_ARCHS=${FASTPEFT_CUDA_ARCHS:-90}
fi

# 0b. optional offline wheels (peers for the benchmark); never fatal: a peer that is absent is reported
WHEELS_DIR=${WHEELS_DIR:-benchmarks/wheels}
if compgen -G "$WHEELS_DIR/*.whl" > /dev/null; then
  step "install wheels from $WHEELS_DIR" 60 wheels.log -- "$PY" -m pip install --no-deps --no-index -q "$WHEELS_DIR"/*.whl \
    || { FAILED_STEPS+=("wheels (see wheels.log)"); echo "gpu_run.sh: wheels did not install; continuing" >&2; }
fi

# 1. build the extension in place (fails if it cannot be built)
if [[ ${SKIP_BUILD:-0} == 1 ]]; then
  say "build skipped (SKIP_BUILD=1)"
else
  export FASTPEFT_REQUIRE_EXT=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
  step "build extension" 300 build.log -- "$PY" setup.py build_ext --inplace
fi
step "load extension" 60 load.log -- "$PY" -c "
from fastpeft import _ext
assert _ext.load() is not None, f'fastpeft._C does not load: {_ext.unavailable_reason()}'
m = _ext.metadata() or {}
print('fastpeft._C loaded; CUDA kernels:', m.get('with_cuda'), m.get('cuda_archs'))
assert '$DEVICE' != 'cuda' or _ext.has_cuda_kernels(), 'the extension was built without CUDA kernels'"
step "fastpeft info" 60 info.txt -- "$PY" -m fastpeft info --device "$DEVICE"

# 2. GPU tests (tests marked gpu: the GPU cases of each tests/ops/test_<op>.py and, for every op,
#    tests/ops/test_every_op.py). One autotune config per kernel: every Triton config is a separate
#    compile, and these check numbers, not speed. pytest-xdist, when there, compiles in parallel processes.
STEP="GPU tests"
PYTEST_ARGS=(-m gpu tests/ -q -p no:cacheprovider -rs)
if "$PY" -c "import xdist" 2>/dev/null; then PYTEST_ARGS+=(-n "${GPU_TEST_WORKERS:-8}"); fi
if [[ ${KEEP_GOING:-0} == 1 ]]; then
  FASTPEFT_TRITON_AUTOTUNE=off step "GPU tests" 240 pytest_gpu.log -- "$PY" -m pytest "${PYTEST_ARGS[@]}" || {
    FAILED_STEPS+=("GPU tests (exit $?)"); echo "gpu_run.sh: GPU tests failed; KEEP_GOING=1, continuing" >&2; }
else
  FASTPEFT_TRITON_AUTOTUNE=off step "GPU tests" 240 pytest_gpu.log -- "$PY" -m pytest "${PYTEST_ARGS[@]}"
fi

# 3. the full benchmark suite, in the time that is left
LEFT=$(( TOTAL - ($(date +%s) - START) - 20 ))
(( LEFT > 60 )) || { STEP="benchmark"; echo "gpu_run.sh: only ${LEFT}s left for the benchmark" >&2; false; }
MAXMIN=$("$PY" -c "print(round(max(1.0, ($LEFT - 45) / 60), 2))")
BENCH_RC=0
export FASTPEFT_TRITON_AUTOTUNE=${FASTPEFT_TRITON_AUTOTUNE:-quick}  # 2 configs per GEMM: compile time
step "benchmark ($SUITE suite, $DEVICE, Triton autotune $FASTPEFT_TRITON_AUTOTUNE)" "$LEFT" bench.log -- \
  "$PY" -m fastpeft bench --suite "$SUITE" --device "$DEVICE" --out "$OUTDIR" --max-minutes "$MAXMIN" --strict \
  || BENCH_RC=$?
# (a failed case makes --strict exit 3 after writing the JSON: show the summary, then fail)
[[ $BENCH_RC -eq 0 ]] || FAILED_STEPS+=("benchmark (exit $BENCH_RC: failed cases, see bench.log)")

# 4. summary, last
STEP="summary"
if [[ $DRY == 1 ]]; then
  say "summary (dry run: nothing ran)"
  exit 0
fi
JSON=$(ls -t "$OUTDIR"/bench-"$DEVICE"-"$SUITE"-*.json 2>/dev/null | head -1 || true)
[[ -n $JSON ]] || { echo "gpu_run.sh: the benchmark wrote no JSON (exit $BENCH_RC); see $OUTDIR/bench.log" >&2; exit 1; }
say "summary of $JSON"
"$PY" -m fastpeft.bench.report --summary "$JSON" | tee "$OUTDIR/summary.txt"
echo ""
echo "gpu_run.sh: done in $(( $(date +%s) - START ))s; outputs in $OUTDIR"
if [[ ${#FAILED_STEPS[@]} -gt 0 ]]; then
  echo "gpu_run.sh: FAILED steps: ${FAILED_STEPS[*]}" >&2
  exit 1
fi
