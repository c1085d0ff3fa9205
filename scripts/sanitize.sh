#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer check of rnn_ext's CPU ops (no GPU needed).
#
#   1. Copies the repository's files (tracked, and untracked ones git does not ignore; no build
#      outputs) into a temporary directory, so the working tree and its rnn_ext/_C*.so stay
#      untouched.
#   2. Builds the CPU-only extension there (RNN_EXT_CUDA=0) with
#        -fsanitize=address,undefined,float-cast-overflow -fno-sanitize-recover=all
#        -fno-omit-frame-pointer -g
#      passed through CFLAGS and LDFLAGS: setuptools appends them to the compiler and linker
#      commands, and torch.utils.cpp_extension's ninja build takes its C++ flags from that
#      compiler command (CXXFLAGS is set too, for setuptools versions that read it). The script
#      checks that the built library really carries the sanitizer runtimes.
#   3. Runs the tests marked `sanitize` (pytest -m sanitize: the cell and layer op tests, the
#      fuzzer, the multi-threaded steps split by rows and by units, the inference ops that
#      project the input in chunks) against that build with libasan preloaded into python
#      (`gcc -print-file-name=libasan.so`); the fuzzer's child process inherits the preload.
#      ASAN_OPTIONS=detect_leaks=0 (CPython leaks by design), UBSAN_OPTIONS=
#      print_stacktrace=1:halt_on_error=1, PYTHONMALLOC=malloc (ASan sees every allocation).
#      The first sanitizer report aborts the process with its stack trace; reports are
#      written to $TMP/sanitizer.<pid> (log_path), so a crashed child's report survives.
#
# usage:  bash scripts/sanitize.sh [extra pytest arguments, e.g. -x or -k lstm]
#   KEEP=1                keep the temporary copy (its path is printed)
#   SANITIZE_TMP=DIR      make the copy in DIR (default: a new mktemp -d directory)
#   MAX_JOBS=N            parallel compile jobs (default: nproc)
#   RNN_EXT_FUZZ_SECONDS, RNN_EXT_FUZZ_CALLS  the fuzz test's budget under the sanitizers
#                         (default 60 s, at most 20000 calls)
#   LOG=FILE              where the test output goes (default: $TMP/sanitize.log)
#
# Exit status: 0 when everything passed and no sanitizer reported; else non-zero. A summary
# of the reports ("ERROR: AddressSanitizer", "runtime error:") is printed at the end.
# Takes 5-8 minutes on 2 cores (build 2-4, tests 3-4; ASan slows the tests ~3x).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
T0=$(date +%s)
elapsed() { echo "$(( $(date +%s) - T0 )) s"; }
die() { echo "sanitize.sh: $*" >&2; exit 2; }

LIBASAN="$(gcc -print-file-name=libasan.so)"
[ -f "$LIBASAN" ] || die "libasan not found (gcc -print-file-name=libasan.so gave '$LIBASAN')"
LIBUBSAN="$(gcc -print-file-name=libubsan.so)"

TMP="${SANITIZE_TMP:-$(mktemp -d -t rnn_ext_sanitize.XXXXXX)}"
mkdir -p "$TMP"
if [ "${KEEP:-0}" != 1 ] && [ -z "${SANITIZE_TMP:-}" ]; then
  trap 'rm -rf "$TMP"' EXIT
fi
LOG="${LOG:-$TMP/sanitize.log}"
echo "sanitize.sh: copy in $TMP, log in $LOG"

# 1. the sources, without build outputs (build/, *.so) or git metadata
( cd "$ROOT" && git ls-files -z --cached --others --exclude-standard ) \
  | grep -zv -e '\.so$' -e '^build/' \
  | ( cd "$ROOT" && tar --null -T - -cf - ) | ( cd "$TMP" && tar -xf - ) \
  || die "could not copy the repository"

# 2. the instrumented build
SAN="-fsanitize=address,undefined,float-cast-overflow -fno-sanitize-recover=all"
SAN="$SAN -fno-omit-frame-pointer -g"
echo "sanitize.sh: building with $SAN ..."
(
  cd "$TMP" &&
  RNN_EXT_CUDA=0 MAX_JOBS="${MAX_JOBS:-$(nproc)}" CFLAGS="$SAN" CXXFLAGS="$SAN" LDFLAGS="$SAN" \
    "$PYTHON" setup.py build_ext --inplace
) > "$TMP/build.log" 2>&1 || { tail -n 40 "$TMP/build.log"; die "the build failed ($(elapsed))"; }
SO="$(ls "$TMP"/rnn_ext/_C*.so 2>/dev/null | head -n 1)"
[ -n "$SO" ] || die "no rnn_ext/_C*.so was built"
# (grep without -q: with pipefail, an early exit would fail the pipe)
readelf -d "$SO" | grep libasan > /dev/null || die "$SO is not linked against libasan: the flags did not reach the link"
nm -D "$SO" | grep __ubsan_handle > /dev/null || die "$SO has no UBSan checks: the flags did not reach the compiler"
nm -D "$SO" | grep __asan_report > /dev/null || die "$SO has no ASan checks: the flags did not reach the compiler"
echo "sanitize.sh: built $SO in $(elapsed)"

# 3. the op tests under the sanitizers
export LD_PRELOAD="$LIBASAN${LIBUBSAN:+:$LIBUBSAN}${LD_PRELOAD:+:$LD_PRELOAD}"
# reports go to stderr and to $TMP/sanitizer.<pid> (which outlives a captured stderr)
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:strict_init_order=1:detect_stack_use_after_return=1:symbolize=1:log_path=$TMP/sanitizer:log_to_syslog=0${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$TMP/sanitizer${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
export PYTHONMALLOC=malloc PYTHONPATH="$TMP" OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
export RNN_EXT_FUZZ_SECONDS="${RNN_EXT_FUZZ_SECONDS:-60}" RNN_EXT_FUZZ_CALLS="${RNN_EXT_FUZZ_CALLS:-20000}"
command -v llvm-symbolizer > /dev/null && export ASAN_SYMBOLIZER_PATH="$(command -v llvm-symbolizer)"

cd "$TMP"
"$PYTHON" - <<EOF || die "the sanitized build does not load (see above)"
import rnn_ext, rnn_ext._backend as b
assert rnn_ext.backend() == "extension", rnn_ext.backend()
assert b._library.__file__.startswith("$TMP"), b._library.__file__
print("sanitize.sh: loaded", b._library.__file__)
EOF

status=0
run_tests() {  # run_tests NAME PYTEST-ARGS...: appends to $LOG, notes the result
  local name=$1; shift
  local t=$(date +%s)
  echo "===== $name: pytest $*" >> "$LOG"
  # --capture=sys: a report written to fd 2 as the process aborts must reach the log
  "$PYTHON" -m pytest -q -p no:cacheprovider --capture=sys "$@" "${EXTRA[@]}" >> "$LOG" 2>&1
  local rc=$?
  local result
  result=$(grep -E '^(=+ )?[0-9]+ (passed|failed|error)|[0-9]+ (passed|failed) in ' "$LOG" | tail -n 1)
  [ $rc -ge 128 ] && result="killed by signal $((rc - 128)) (a sanitizer report aborts the process)"
  echo "sanitize.sh: $name: $([ $rc -eq 0 ] && echo ok || echo "FAILED (rc $rc)") in $(( $(date +%s) - t )) s: $result"
  [ $rc -eq 0 ] || status=1
}
EXTRA=("$@")
: > "$LOG"
# -s: the fuzzer's summary line
run_tests sanitize tests -m sanitize -s

# reports: one file per process that reported (log_path), and any that reached the log
shopt -s nullglob
reports=("$TMP"/sanitizer.*)
if [ ${#reports[@]} -gt 0 ] || grep -qE 'ERROR: AddressSanitizer|runtime error:' "$LOG"; then
  status=1
  echo "sanitize.sh: sanitizer reports:"
  for f in "${reports[@]}"; do echo "--- $f"; head -n 30 "$f"; done
  grep -nE -A 25 'ERROR: AddressSanitizer|runtime error:' "$LOG" | head -n 80
fi
if [ $status -ne 0 ] && [ "${KEEP:-0}" != 1 ] && [ -z "${SANITIZE_TMP:-}" ]; then
  SAVE="${TMPDIR:-/tmp}/rnn_ext_sanitize_$(date +%Y%m%d_%H%M%S)"
  mkdir -p "$SAVE" && cp "$LOG" "$TMP/build.log" "${reports[@]}" "$SAVE"/ 2>/dev/null
  echo "sanitize.sh: logs saved in $SAVE"
fi
echo "sanitize.sh: $([ $status -eq 0 ] && echo CLEAN || echo FAILED) after $(elapsed)"
exit $status
