#!/usr/bin/env bash
# Fetches the Gateway API CRDs Musubi routes by (HTTPRoute and GRPCRoute, standard channel) from
# their Go module, sigs.k8s.io/gateway-api, into charts/musubi/gateway-api/ (not committed: they
# are the Gateway API project's files). The chart installs them with gatewayAPI.installCRDs=true;
# the Kubernetes tests install them into their API server. Idempotent. Prints the directory.
set -euo pipefail
GATEWAY_API_VERSION=v1.6.3
cd "$(dirname "$0")/.."
out=charts/musubi/gateway-api
stamp="${out}/.version"
if [ -f "${stamp}" ] && [ "$(cat "${stamp}")" = "${GATEWAY_API_VERSION}" ]; then
  echo "${out}"
  exit 0
fi
export GOFLAGS=-mod=mod GOTOOLCHAIN=local
dir="$(go mod download -json "sigs.k8s.io/gateway-api@${GATEWAY_API_VERSION}" | sed -n 's/.*"Dir": "\(.*\)",/\1/p')"
[ -d "${dir}" ] || { echo "go mod download sigs.k8s.io/gateway-api@${GATEWAY_API_VERSION} failed" >&2; exit 1; }
mkdir -p "${out}"
for kind in httproutes grpcroutes; do
  cp "${dir}/config/crd/standard/gateway.networking.k8s.io_${kind}.yaml" "${out}/${kind}.yaml"
  chmod u+w "${out}/${kind}.yaml"
done
echo "${GATEWAY_API_VERSION}" > "${stamp}"
echo "${out}"
