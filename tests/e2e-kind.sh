#!/usr/bin/env bash
# End to end on a real Kubernetes cluster made by kind (.github/workflows/e2e.yml; locally:
# `kind create cluster --name kvstack-e2e && make e2e-kind`), through the CLI as a person runs
# it. `kvstack deploy kind` loads the images `make images` built into the cluster, applies the
# minikube overlay (kind's default storage class is also "standard"), waits for every rollout
# and runs the smoke Job (rolling back on failure); then a server pod is killed and must be
# replaced, and `kvstack scale kind server 5` scales it. Logs and events are dumped when a step
# fails.
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER=${KIND_CLUSTER:-kvstack-e2e}
NS=kvstack
KVSTACK=.venv/bin/kvstack
k() { kubectl --context "kind-$CLUSTER" --namespace "$NS" "$@"; }

dump() {
  echo "==> e2e failed; state of the cluster" >&2
  k get all,pvc,events --output wide >&2 || true
  k logs --selector app.kubernetes.io/part-of=kvstack --all-containers --prefix --tail=100 >&2 || true
}
trap dump ERR

kubectl config use-context "kind-$CLUSTER"
echo "==> deploy: load the images, apply, wait for the rollouts, smoke test"
"$KVSTACK" deploy kind

echo "==> killing a server pod; the Deployment must replace it"
victim=$(k get pods --selector app.kubernetes.io/name=server --output jsonpath='{.items[0].metadata.name}')
k delete pod "$victim" --wait=true
k rollout status deployment/server --timeout=300s
ready=$(k get deployment/server --output jsonpath='{.status.readyReplicas}')
[[ $ready -ge 2 ]] || { echo "server has $ready ready replicas after losing one" >&2; false; }

echo "==> scaling the server to 5 (its autoscaler's bounds move too)"
"$KVSTACK" scale kind server 5
ready=$(k get deployment/server --output jsonpath='{.status.readyReplicas}')
[[ $ready -eq 5 ]] || { echo "server has $ready ready replicas, not 5" >&2; false; }
echo "==> e2e passed"
