#!/usr/bin/env bash
# Make a cluster's CurveZMQ keys and print them as the Secret `fabric-keys` the manifests mount:
#   bash deploy/k8s/keys-secret.sh ~/fabric-k8s-keys | kubectl apply -n fabric -f -
# The keys directory stays with you (its client pair is what your laptop uses: FABRIC_KEYS).
set -euo pipefail
dir="${1:?usage: keys-secret.sh KEYS_DIR (made with fabric keys init if it does not exist)}"
[ -f "$dir/broker.key_secret" ] || fabric keys init "$dir" >&2
kubectl create secret generic fabric-keys --dry-run=client -o yaml \
  --from-file=broker.key="$dir/broker.key" --from-file=broker.key_secret="$dir/broker.key_secret" \
  --from-file=client.key="$dir/client.key" --from-file=client.key_secret="$dir/client.key_secret" \
  --from-file=executor.key="$dir/executor.key" --from-file=executor.key_secret="$dir/executor.key_secret" \
  --from-file=allowed-client.key="$dir/clients/client.key" \
  --from-file=allowed-executor.key="$dir/executors/executor.key"
