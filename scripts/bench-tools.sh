#!/usr/bin/env bash
# Installs the benchmark's load generator (fortio, built from its Go module) into
# ~/.cache/musubi/bin, once. Idempotent; the test command and `bench/README.md` call it.
set -euo pipefail
FORTIO_VERSION=v1.66.5   # newer releases pull a module the Go proxy here does not serve
BIN="${HOME}/.cache/musubi/bin"
if [ -x "${BIN}/fortio" ] && [ "$("${BIN}/fortio" version 2>/dev/null)" = "${FORTIO_VERSION#v}" ]; then
  exit 0
fi
mkdir -p "${BIN}"
GOBIN="${BIN}" GOFLAGS=-mod=mod go install "fortio.org/fortio@${FORTIO_VERSION}"
echo "fortio $("${BIN}/fortio" version) in ${BIN}"
