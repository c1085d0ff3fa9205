#!/usr/bin/env bash
# The GPU check, unattended, on a bare CUDA machine with no network (torch, nvcc, pytest there):
# builds rnn_ext from source for the local GPU, runs the CUDA tests (and, where the machine
# supports it, the CUDA op tests under compute-sanitizer memcheck), runs the GPU benchmark grid,
# and writes a short report to $OUT (default ./gpu_out). Each stage has a time limit, cut to
# what is left of the whole run's budget (BUDGET seconds, default 540), so the report is written
# inside a 10-minute call; a failing stage is reported and the next one runs.
#   usage: OUT=/some/dir bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
REPORT="$OUT/report.md"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
status=0
BUDGET="${BUDGET:-540}"
START=$(date +%s)

stage() {  # stage NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log, note the result
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  local left=$(( BUDGET - (t0 - START) - 15 ))  # 15 s kept for the report
  if [ "$left" -lt 10 ]; then
    echo "| $name | skipped (budget spent) | 0 s |" >> "$REPORT"
    status=1
    return 1
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "| $name | $([ $rc -eq 0 ] && echo ok || echo "FAILED (rc $rc)") | $(( $(date +%s) - t0 )) s |" >> "$REPORT"
  [ $rc -eq 0 ] || status=1
  return $rc
}

{
  echo "# rnn_ext GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo '```'
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0))" 2>&1
  nvcc --version 2>&1 | tail -n 2
  echo '```'
  echo
  echo "| stage | result | time |"
  echo "| --- | --- | --- |"
} > "$REPORT"

if stage build 420 python3 setup.py build_ext --inplace; then
  stage cuda_tests 240 python3 -m pytest tests -q -x -m cuda -p no:cacheprovider
  stage benchmarks 300 python3 -m benchmarks.run --device cuda --out "$OUT/bench"
  if command -v compute-sanitizer > /dev/null; then  # last: the figures matter more
    stage memcheck 150 compute-sanitizer --tool memcheck --error-exitcode 1 \
      python3 -m pytest tests -q -x -m "cuda and sanitize" -p no:cacheprovider
  fi
fi

{
  echo
  for log in cuda_tests memcheck; do
    [ -f "$OUT/$log.log" ] && { echo "## $log (tail)"; echo '```'; tail -n 15 "$OUT/$log.log"; echo '```'; }
  done
  [ -f "$OUT/build.log" ] && [ ! -f "$OUT/cuda_tests.log" ] && { echo '## build (tail)'; echo '```'; tail -n 30 "$OUT/build.log"; echo '```'; }
  [ -f "$OUT/benchmarks.log" ] && { echo "## benchmarks"; grep -E '^\|' "$OUT/benchmarks.log"; }
} >> "$REPORT"
cat "$REPORT"
exit $status
