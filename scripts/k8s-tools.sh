#!/usr/bin/env bash
# Builds the Kubernetes test tools from their Go modules, once, into
# ~/.cache/musubi/k8s/<kubernetes version>/: kube-apiserver and kubectl (k8s.io/kubernetes),
# etcd (go.etcd.io/etcd/server/v3) and helm (helm.sh/helm/v3). Idempotent: a rerun with the
# binaries present does nothing. Prints the directory on its last line.
#
# k8s.io/kubernetes cannot be `go install`ed directly: its go.mod points every k8s.io/* staging
# module at ./staging. A small wrapper module requires it and replaces each staging module with
# the published v0.<minor>.<patch> of the same release.
set -euo pipefail
K8S_VERSION=v1.37.2
ETCD_VERSION=v3.7.3
HELM_VERSION=v3.22.0
OUT="${HOME}/.cache/musubi/k8s/${K8S_VERSION}"
WORK="${HOME}/.cache/musubi/k8s/build"
export GOFLAGS=-mod=mod GOTOOLCHAIN=local CGO_ENABLED=0
# Two cores: one Go build at a time, and not all cores for it when cargo also runs.
export GOMAXPROCS="${GOMAXPROCS:-2}"

have() { [ -x "${OUT}/$1" ]; }
mkdir -p "${OUT}" "${WORK}"

if ! have kube-apiserver || ! have kubectl || ! have etcd || ! have helm; then
  # All four in one module: one version of every shared dependency (client-go, etcd, grpc,
  # protobuf, ...), so each package compiles once. etcd and helm follow the versions
  # k8s.io/kubernetes selects.
  dir="${WORK}/tools"
  rm -rf "${dir}" && mkdir -p "${dir}/etcd"
  # Private module and build caches (~5 GB together), removed once the binaries exist: only
  # the binaries are kept, and the disk is needed for the Rust test build that follows.
  export GOMODCACHE="${WORK}/gomod" GOCACHE="${WORK}/gocache"
  staging="v0.${K8S_VERSION#v1.}"
  gomod="$(go mod download -json "k8s.io/kubernetes@${K8S_VERSION}" | sed -n 's/.*"GoMod": "\(.*\)",/\1/p')"
  {
    echo "module musubi.io/k8s-tools"
    echo
    sed -n 's/^go \(.*\)/go \1/p' "${gomod}"
    echo
    echo "require ("
    echo "	k8s.io/kubernetes ${K8S_VERSION}"
    echo "	go.etcd.io/etcd/server/v3 ${ETCD_VERSION}"
    echo "	helm.sh/helm/v3 ${HELM_VERSION}"
    echo ")"
    echo
    echo "replace ("
    sed -n 's#^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => ./staging/src/.*#\t\1 => \1 '"${staging}"'#p' "${gomod}"
    echo ")"
  } >"${dir}/go.mod"
  cat >"${dir}/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "helm.sh/helm/v3/cmd/helm"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
  cat >"${dir}/etcd/main.go" <<'GO'
// etcd, built from its server module: the same entry point as the etcd binary.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
  (cd "${dir}" && go mod tidy)
  (cd "${dir}" && go build -trimpath \
    -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=${K8S_VERSION} -X k8s.io/client-go/pkg/version.gitVersion=${K8S_VERSION} -X helm.sh/helm/v3/internal/version.version=${HELM_VERSION}" \
    -o "${OUT}/" k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl helm.sh/helm/v3/cmd/helm ./etcd)
  go clean -modcache
  rm -rf "${WORK}"
fi

echo "${OUT}"
