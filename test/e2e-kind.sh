#!/usr/bin/env bash
# End to end on a real Kubernetes cluster made by kind (.github/workflows/e2e.yml; locally:
# `kind create cluster --name kvstack-e2e && make e2e-kind`). The images are built by `make
# images`; this loads them, applies the minikube overlay (kind's default storage class is also
# "standard"), runs the smoke Job, kills a server pod and waits for its replacement, then scales
# the server to 5. Logs and events are dumped when a step fails.
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

version=$("$KVSTACK" images --dry-run 2>/dev/null | head -1 | cut -d: -f2)
echo "==> loading images at $version into kind/$CLUSTER"
release=$(mktemp -d)
trap 'rm -rf "$release"' EXIT
{
  echo "apiVersion: kustomize.config.k8s.io/v1beta1"
  echo "kind: Kustomization"
  echo "resources: [$(realpath --relative-to="$release" deploy/overlays/minikube)]"
  echo "images:"
} >"$release/kustomization.yaml"
for image in $("$KVSTACK" images --dry-run 2>/dev/null); do
  kind load docker-image --name "$CLUSTER" "$image"
  echo "  - {name: ${image%%:*}, newTag: $version}" >>"$release/kustomization.yaml"
done

echo "==> applying the minikube overlay"
kubectl --context "kind-$CLUSTER" apply --kustomize "$release"
k rollout status statefulset/backend --timeout=300s
k rollout status deployment/server --timeout=300s

echo "==> smoke test (the client Job: every tier), polled until Complete or Failed"
# `kubectl wait --for=condition=complete` would not return on failure (one condition only).
k patch job/client --type=merge --patch '{"spec":{"suspend":false}}'
state=""
for _ in $(seq 150); do
  state=$(k get job/client --output jsonpath='{range .status.conditions[?(@.status=="True")]}{.type}{" "}{end}')
  case " $state " in
    *" Complete "*) break ;;
    *" Failed "* | *" FailureTarget "*)
      k logs job/client --tail=50 >&2
      echo "the smoke Job failed (conditions: $state)" >&2
      false
      ;;
  esac
  sleep 2
done
[[ " $state " == *" Complete "* ]] || { echo "the smoke Job did not finish within 300 s" >&2; false; }

echo "==> killing a server pod; the Deployment must replace it"
victim=$(k get pods --selector app.kubernetes.io/name=server --output jsonpath='{.items[0].metadata.name}')
k delete pod "$victim" --wait=true
k rollout status deployment/server --timeout=300s
ready=$(k get deployment/server --output jsonpath='{.status.readyReplicas}')
[[ $ready -ge 2 ]] || { echo "server has $ready ready replicas after losing one" >&2; false; }

echo "==> scaling the server to 5 (the autoscaler's bounds first, as kvstack scale does)"
k patch horizontalpodautoscaler/server --type=merge --patch '{"spec":{"minReplicas":5,"maxReplicas":5}}'
k scale deployment/server --replicas=5
k rollout status deployment/server --timeout=300s
ready=$(k get deployment/server --output jsonpath='{.status.readyReplicas}')
[[ $ready -eq 5 ]] || { echo "server has $ready ready replicas, not 5" >&2; false; }
echo "==> e2e passed"
