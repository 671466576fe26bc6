#!/usr/bin/env bash
# Regenerates cli/src/install/manifests.yaml, the objects `musubi install` prints: the chart
# rendered by Helm with placeholders where the certificates go (the command fills them in).
# The Kubernetes tests fail when the committed file differs from what the chart renders.
# Usage: scripts/render-install.sh [OUTPUT]   (default: cli/src/install/manifests.yaml)
set -euo pipefail
out="$(realpath -m "${1:-$(dirname "$0")/../cli/src/install/manifests.yaml}")"
cd "$(dirname "$0")/.."
helm="${MUSUBI_K8S_BIN:-$(./scripts/k8s-tools.sh | tail -n 1)}/helm"
"${helm}" template musubi charts/musubi --namespace musubi-system --include-crds \
  --set 'identity.trustAnchorsPEM=-----BEGIN CERTIFICATE----- MUSUBI_TRUST_ANCHORS_PEM' \
  --set identity.issuer.crtPEM=MUSUBI_ISSUER_CRT_PEM \
  --set identity.issuer.keyPEM=MUSUBI_ISSUER_KEY_PEM \
  --set injector.tls.crtPEM=MUSUBI_WEBHOOK_CRT_PEM \
  --set injector.tls.keyPEM=MUSUBI_WEBHOOK_KEY_PEM \
  --set injector.tls.caPEM=MUSUBI_WEBHOOK_CA_PEM \
  >"${out}"
