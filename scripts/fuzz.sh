#!/usr/bin/env bash
# Builds and runs Musubi's fuzz targets (fuzz/, cargo-fuzz on the nightly toolchain). Installs
# what it needs first (idempotent). See fuzz/README.md.
#
#   scripts/fuzz.sh smoke            build every target, run each for SMOKE_SECONDS (15)
#   scripts/fuzz.sh long [SECONDS]   run each target for SECONDS (600), one after another
#   scripts/fuzz.sh build            only build
#   scripts/fuzz.sh run TARGET [SECONDS] [LIBFUZZER ARGS...]
#
# FUZZ_TARGETS="detect transport" limits smoke and long to those targets; FUZZ_SANITIZER
# (address, the default, or none: a shorter build and faster runs, for code without unsafe
# dependencies to check), FUZZ_FEATURES (the fuzz crate's features, e.g. ignore-known-bugs)
# and FUZZ_TARGET_DIR (default fuzz/target; a directory that outlives the
# checkout, like ~/.cache, makes a CI build warm) change the build. Every run is one
# libFuzzer process (no -fork, no -jobs): the machines have two cores. Any crash, timeout or
# out-of-memory makes the script exit 1 after the other targets have run; the input that did it
# is in fuzz/artifacts/<target>/ (reproduce: cargo +nightly fuzz run <target> <file>).
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_FUZZ_VERSION=0.13.2
SMOKE_SECONDS="${SMOKE_SECONDS:-15}"
LONG_SECONDS=600
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
export CARGO_INCREMENTAL=0

# cargo-fuzz's defaults (optimized, debug assertions and overflow checks, AddressSanitizer),
# with 16 codegen units instead of 1: a much shorter build for slightly slower code.
# Build and run must get the same flags, or `run` rebuilds.
# FUZZ_PROFILE=dev builds without optimizations instead: what CI's smoke run uses (with
# FUZZ_SANITIZER=none: 289 s cold here against 1395 s for the default build), because a smoke
# run only has to prove every target starts and survives its seeds and seconds of mutation.
case "${FUZZ_PROFILE:-release}" in
  release) BUILD_FLAGS=(--debug-assertions --codegen-units 16) ;;
  dev) BUILD_FLAGS=(--dev) ;;
  *) echo "FUZZ_PROFILE must be release or dev" >&2; exit 64 ;;
esac
BUILD_FLAGS+=(--sanitizer "${FUZZ_SANITIZER:-address}")
if [ -n "${FUZZ_FEATURES:-}" ]; then
  BUILD_FLAGS+=(--features "${FUZZ_FEATURES}")
fi
if [ -n "${FUZZ_TARGET_DIR:-}" ]; then
  BUILD_FLAGS+=(--target-dir "${FUZZ_TARGET_DIR}")
fi

step() { printf '\n==> %s\n' "$*"; }

setup() {
  if ! cargo +nightly --version >/dev/null 2>&1; then
    rustup toolchain install nightly --profile minimal
  fi
  if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked --version "${CARGO_FUZZ_VERSION}"
  fi
  # The same dependency versions as the workspace: start from its lock file (cargo then adds
  # libfuzzer-sys and drops what the targets do not use). Refreshed when the root one changes.
  if [ ! -f fuzz/Cargo.lock ] || [ Cargo.lock -nt fuzz/Cargo.lock ]; then
    cp Cargo.lock fuzz/Cargo.lock
  fi
}

all_targets() {
  cargo +nightly fuzz list
}

build() {
  step "build fuzz targets"
  local start=${SECONDS}
  cargo +nightly fuzz build "${BUILD_FLAGS[@]}"
  echo "built in $((SECONDS - start)) s"
}

# Per-target libFuzzer options: inputs as large as the parser's own limit where that matters.
target_args() {
  local dict="fuzz/dict/$1.dict"
  [ -f "${dict}" ] && echo "-dict=${dict}"
  case "$1" in
    detect) echo "-max_len=9000" ;; # past the 8 KiB peek limit
    csr) echo "-max_len=4200" ;;    # past MAX_CSR_BYTES
    *) ;;
  esac
}

# Runs one target for $2 seconds; new inputs go to fuzz/work/<target> (git-ignored), the
# committed seeds in fuzz/corpus/<target> are only read.
run_one() {
  local target="$1" seconds="$2"
  shift 2
  local work="fuzz/work/${target}" log="fuzz/work/logs/${target}.log"
  mkdir -p "${work}" "fuzz/work/logs" "fuzz/corpus/${target}"
  local args
  mapfile -t args < <(target_args "${target}")
  step "fuzz ${target} for ${seconds} s"
  local status=0
  cargo +nightly fuzz run "${BUILD_FLAGS[@]}" "${target}" "${work}" "fuzz/corpus/${target}" -- \
    -max_total_time="${seconds}" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    "${args[@]}" "$@" >"${log}" 2>&1 || status=$?
  summarize "${target}" "${log}" "${status}"
  return "${status}"
}

# One line per run: executions, time, coverage from libFuzzer's final lines.
summarize() {
  local target="$1" log="$2" status="$3"
  local execs secs cov
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "${log}" | tail -n 1)
  secs=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "${log}" | tail -n 1)
  cov=$(grep -E '^#[0-9]+' "${log}" | tail -n 1 | grep -oE 'cov: [0-9]+ ft: [0-9]+' || true)
  if [ "${status}" = 0 ]; then
    printf '%-12s ok     %12s execs %6s s  %s\n' "${target}" "${execs:-?}" "${secs:-?}" "${cov}" |
      tee -a fuzz/work/logs/summary.txt
  else
    printf '%-12s FAILED (exit %s), log %s\n' "${target}" "${status}" "${log}" |
      tee -a fuzz/work/logs/summary.txt
    grep -E '^(==[0-9]+==|SUMMARY|thread .* panicked|artifact_prefix|Test unit written)' "${log}" | head -n 20 || true
  fi
}

run_all() {
  local seconds="$1" targets failed=()
  read -r -a targets <<<"${FUZZ_TARGETS:-$(all_targets | tr '\n' ' ')}"
  mkdir -p fuzz/work/logs
  : >fuzz/work/logs/summary.txt
  local start=${SECONDS}
  for t in "${targets[@]}"; do
    run_one "${t}" "${seconds}" || failed+=("${t}")
  done
  step "summary ($((SECONDS - start)) s)"
  cat fuzz/work/logs/summary.txt
  if [ "${#failed[@]}" -gt 0 ]; then
    echo "failed: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    return 1
  fi
}

case "${1:-}" in
  smoke)
    setup
    build
    run_all "${SMOKE_SECONDS}"
    ;;
  long)
    setup
    build
    run_all "${2:-${LONG_SECONDS}}"
    ;;
  build)
    setup
    build
    ;;
  run)
    [ -n "${2:-}" ] || { echo "usage: $0 run TARGET [SECONDS] [LIBFUZZER ARGS...]" >&2; exit 64; }
    setup
    target="$2"
    seconds="${3:-${LONG_SECONDS}}"
    shift $(($# < 3 ? $# : 3))
    run_one "${target}" "${seconds}" "$@"
    ;;
  *)
    echo "usage: $0 smoke | long [SECONDS] | build | run TARGET [SECONDS] [ARGS...]" >&2
    exit 64
    ;;
esac
