"""Our own policies on the rendered manifests: what the schema and checkov do not check.

Each policy is a function from rendered documents to a list of violations; the tests run it on
every overlay x component combination, and `test_policies_can_fail` feeds each one a manifest
broken on purpose, so none of them passes vacuously.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from kvstack import runtime
from kvstack.client import default_write_timeout
from kvstack.ops import catalog, manifests, model
from kvstack.ops.catalog import Service
from kvstack.runtime import RuntimeConfig
from kvstack.server import ServerConfig

from .render import COMBINATION_IDS, Rendered

Doc = dict[str, Any]
Docs = list[Doc]

WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Job")
LONG_RUNNING_KINDS = ("Deployment", "StatefulSet")
MIN_REPLICAS = 2


def services() -> dict[str, Service]:
    return catalog.services()


def workloads(docs: Docs, kinds: tuple[str, ...] = WORKLOAD_KINDS) -> Docs:
    return [d for d in docs if d["kind"] in kinds]


def containers(workload: Doc) -> list[Doc]:
    spec = workload["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def env_of(container: Doc) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


# -- Policies -----------------------------------------------------------------------------------


def autoscalers(docs: Docs) -> dict[str, Doc]:
    """Each HorizontalPodAutoscaler, by the name of the workload it scales."""
    return {
        d["spec"]["scaleTargetRef"]["name"]: d
        for d in docs
        if d["kind"] == "HorizontalPodAutoscaler"
    }


def check_replicas(docs: Docs) -> list[str]:
    """Long-running services (the replicated backend included) run >= 2 replicas: the
    workload's own count, else its autoscaler's floor (else Kubernetes' default, 1)."""
    out = []
    hpas = autoscalers(docs)
    for w in workloads(docs, LONG_RUNNING_KINDS):
        name = w["metadata"]["name"]
        floor = hpas[name]["spec"]["minReplicas"] if name in hpas else 1
        replicas = w["spec"].get("replicas", floor)
        if replicas < MIN_REPLICAS:
            out.append(f"{w['kind']}/{name}: {replicas} replicas, want >= {MIN_REPLICAS}")
    return out


def check_probes(docs: Docs) -> list[str]:
    """Every long-running container has gRPC startup, readiness and liveness probes on its port."""
    out = []
    for w in workloads(docs, LONG_RUNNING_KINDS):
        for c in containers(w):
            grpc_ports = [p["containerPort"] for p in c.get("ports", []) if p["name"] == "grpc"]
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                port = c.get(probe, {}).get("grpc", {}).get("port")
                if port is None or port not in grpc_ports:
                    out.append(f"{w['metadata']['name']}/{c['name']}: no gRPC {probe} on grpc")
    return out


def check_image_tags(docs: Docs) -> list[str]:
    """Every image names a tag or digest, and never `latest`."""
    out = []
    for w in workloads(docs):
        for c in containers(w):
            image = c["image"]
            name, _, tag = image.rpartition(":")
            if "@sha256:" in image:
                continue
            if not name or "/" in tag or tag in ("", "latest"):
                out.append(
                    f"{w['metadata']['name']}/{c['name']}: image {image!r} has no pinned tag"
                )
    return out


def check_resources(docs: Docs) -> list[str]:
    """Every container requests and limits both CPU and memory."""
    out = []
    for w in workloads(docs):
        for c in containers(w):
            res = c.get("resources", {})
            for bound in ("requests", "limits"):
                for what in ("cpu", "memory"):
                    if what not in res.get(bound, {}):
                        out.append(f"{w['metadata']['name']}/{c['name']}: no {bound}.{what}")
    return out


def _selects(selector: Doc, workload: Doc) -> bool:
    labels = workload["spec"]["template"]["metadata"]["labels"]
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def check_disruption(docs: Docs) -> list[str]:
    """A PDB for every long-running workload; an HPA for every Deployment, from its replicas."""
    out = []
    pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    hpas = autoscalers(docs)
    for w in workloads(docs, LONG_RUNNING_KINDS):
        name = w["metadata"]["name"]
        if not any(_selects(p["spec"]["selector"], w) for p in pdbs):
            out.append(f"{w['kind']}/{name}: no PodDisruptionBudget selects its pods")
        if w["kind"] == "Deployment":
            hpa = hpas.get(name)
            if hpa is None:
                out.append(f"Deployment/{name}: no HorizontalPodAutoscaler")
            elif not MIN_REPLICAS <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]:
                out.append(f"Deployment/{name}: HPA bounds do not start at {MIN_REPLICAS}")
            strategy = w["spec"].get("strategy", {}).get("rollingUpdate", {})
            if strategy.get("maxUnavailable") != 0:
                out.append(f"Deployment/{name}: rolling update may drop below desired count")
    return out


RESTRICTED_CONTAINER = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "runAsUser": catalog.RUNTIME_UID,
}


def check_security(docs: Docs) -> list[str]:
    """Pod Security Standards "restricted" (and a read-only root, no token) on every pod."""
    out = []
    for w in workloads(docs):
        name = w["metadata"]["name"]
        pod = w["spec"]["template"]["spec"]
        if pod.get("automountServiceAccountToken") is not False:
            out.append(f"{name}: mounts a service account token")
        if pod.get("securityContext", {}).get("seccompProfile", {}).get("type") != "RuntimeDefault":
            out.append(f"{name}: pod seccomp profile is not RuntimeDefault")
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            if pod.get(flag):
                out.append(f"{name}: {flag}")
        for c in containers(w):
            sc = c.get("securityContext", {})
            for key, wanted in RESTRICTED_CONTAINER.items():
                if sc.get(key) != wanted:
                    out.append(f"{name}/{c['name']}: securityContext.{key} is not {wanted}")
            if sc.get("capabilities", {}).get("drop") != ["ALL"] or sc.get("capabilities", {}).get(
                "add"
            ):
                out.append(f"{name}/{c['name']}: capabilities are not exactly drop ALL")
            if sc.get("privileged"):
                out.append(f"{name}/{c['name']}: privileged")
    for ns in (d for d in docs if d["kind"] == "Namespace"):
        labels = ns["metadata"].get("labels", {})
        if labels.get("pod-security.kubernetes.io/enforce") != "restricted":
            out.append(f"namespace {ns['metadata']['name']} does not enforce PSS restricted")
    if not any(d["kind"] == "Namespace" for d in docs):
        out.append("no Namespace: nothing enforces the restricted profile")
    return out


def check_autoscaled_sets_no_replicas(docs: Docs) -> list[str]:
    """A workload an HPA scales sets no `replicas`: each apply would reset the autoscaler's
    count to the manifest's (Kubernetes' advice, cited in kvstack.ops.manifests.deployment)."""
    hpas = autoscalers(docs)
    return [
        f"{w['kind']}/{w['metadata']['name']}: sets replicas, which its HPA owns"
        for w in workloads(docs, LONG_RUNNING_KINDS)
        if w["metadata"]["name"] in hpas and "replicas" in w["spec"]
    ]


def check_shutdown_timing(docs: Docs) -> list[str]:
    """The grace period outlasts the preStop pause plus the service's own drain."""
    out = []
    for w in workloads(docs, LONG_RUNNING_KINDS):
        pod = w["spec"]["template"]["spec"]
        grace = pod.get("terminationGracePeriodSeconds", 30)
        for c in containers(w):
            pause = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds")
            drain = float(env_of(c).get("KVSTACK_SHUTDOWN_GRACE", "10"))
            if pause is None:
                out.append(f"{w['metadata']['name']}/{c['name']}: no preStop sleep")
            elif grace <= pause + drain:
                out.append(
                    f"{w['metadata']['name']}: grace {grace}s <= preStop {pause}s + drain {drain}s"
                )
    return out


# A pod's process start (imports, gRPC listening, LMDB open) to SERVING: 0.2 to 2.5 s measured on
# the local target (make bench, "Where the primary's restart went"); this much is allowed.
PROCESS_START_S = 5.0


def _setting(container: Doc | None, config: type[Any], env: str) -> float:
    """A setting as a container's env sets it, else the service's own default."""
    if container is not None and env in env_of(container):
        return float(env_of(container)[env])
    return float(next(d for e, d, _ in runtime.settings_of(config) if e == env))


def check_primary_restart_fits_a_write(docs: Docs) -> list[str]:
    """A planned restart of the primary (the stateful backend's pod: preStop pause, drain,
    process start, the startup and readiness probes' first success, when its pod joins the
    headless Service's DNS) ends before a write waiting for it gives up: within the server's
    KVSTACK_PRIMARY_WAIT and the client's write deadline. Otherwise every release of the
    backend would fail writes (docs/architecture.md, "Writes wait for the primary")."""
    by_kind = {w["kind"]: w for w in workloads(docs)}
    server = containers(by_kind["Deployment"])[0] if "Deployment" in by_kind else None
    job = containers(by_kind["Job"])[0] if "Job" in by_kind else None
    waits = {
        "the server's KVSTACK_PRIMARY_WAIT": _setting(server, ServerConfig, "KVSTACK_PRIMARY_WAIT"),
        "the client's KVSTACK_WRITE_TIMEOUT": float(
            env_of(job).get("KVSTACK_WRITE_TIMEOUT", default_write_timeout())
            if job is not None
            else default_write_timeout()
        ),
    }
    out = []
    for w in workloads(docs, ("StatefulSet",)):
        for c in containers(w):
            pause = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
            drain = _setting(c, RuntimeConfig, "KVSTACK_SHUTDOWN_GRACE")
            probes = sum(c.get(p, {}).get("periodSeconds", 10) + c.get(p, {}).get(
                "initialDelaySeconds", 0) for p in ("startupProbe", "readinessProbe"))  # fmt: skip
            restart = pause + drain + PROCESS_START_S + probes
            out += [
                f"{w['metadata']['name']}: a restart may take {restart:g} s (preStop {pause} + "
                f"drain {drain:g} + start {PROCESS_START_S:g} + probes {probes} s), not less "
                f"than {name} ({wait:g} s)"
                for name, wait in waits.items()
                if restart >= wait
            ]
    return out


POLICIES: list[Callable[[Docs], list[str]]] = [
    check_replicas,
    check_probes,
    check_image_tags,
    check_resources,
    check_disruption,
    check_autoscaled_sets_no_replicas,
    check_security,
    check_shutdown_timing,
    check_primary_restart_fits_a_write,
]


@pytest.mark.parametrize("policy", POLICIES, ids=[p.__name__ for p in POLICIES])
@pytest.mark.parametrize("combination", COMBINATION_IDS)
def test_policy(
    renders: dict[str, Rendered], combination: str, policy: Callable[[Docs], list[str]]
) -> None:
    """Each policy holds for each overlay x component combination (see the policy's docstring)."""
    assert policy(renders[combination].docs) == []


# -- The policies catch what they are for -------------------------------------------------------


def _break_replicas(docs: Docs) -> None:
    next(w for w in docs if w["kind"] == "Deployment")["spec"]["replicas"] = 1


def _break_probes(docs: Docs) -> None:
    del containers(next(w for w in docs if w["kind"] == "StatefulSet"))[0]["readinessProbe"]


def _break_tags(docs: Docs) -> None:
    containers(next(w for w in docs if w["kind"] == "Job"))[0]["image"] = "kvstack-client:latest"


def _break_resources(docs: Docs) -> None:
    del containers(next(w for w in docs if w["kind"] == "Job"))[0]["resources"]["limits"]


def _break_disruption(docs: Docs) -> None:
    docs[:] = [d for d in docs if d["kind"] != "HorizontalPodAutoscaler"]


def _break_autoscaled(docs: Docs) -> None:
    next(w for w in docs if w["kind"] == "Deployment")["spec"]["replicas"] = 2


def _break_security(docs: Docs) -> None:
    sc = containers(next(w for w in docs if w["kind"] == "Deployment"))[0]["securityContext"]
    sc["allowPrivilegeEscalation"] = True


def _break_timing(docs: Docs) -> None:
    pod = next(w for w in docs if w["kind"] == "Deployment")["spec"]["template"]["spec"]
    pod["terminationGracePeriodSeconds"] = model.PRESTOP_SECONDS


def _break_restart(docs: Docs) -> None:
    ready = containers(next(w for w in docs if w["kind"] == "StatefulSet"))[0]["readinessProbe"]
    ready["periodSeconds"] = 20


BREAKERS: dict[str, Callable[[Docs], None]] = {
    "check_replicas": _break_replicas,
    "check_probes": _break_probes,
    "check_image_tags": _break_tags,
    "check_resources": _break_resources,
    "check_disruption": _break_disruption,
    "check_autoscaled_sets_no_replicas": _break_autoscaled,
    "check_security": _break_security,
    "check_shutdown_timing": _break_timing,
    "check_primary_restart_fits_a_write": _break_restart,
}


@pytest.mark.parametrize("policy", POLICIES, ids=[p.__name__ for p in POLICIES])
def test_policies_can_fail(
    shipped: dict[str, Rendered], policy: Callable[[Docs], list[str]]
) -> None:
    """Each policy reports a manifest broken on purpose in the way it guards against."""
    docs = copy.deepcopy(shipped["gke"].docs)
    BREAKERS[policy.__name__](docs)
    assert policy(docs) != []


def test_every_long_running_service_has_a_workload(shipped: dict[str, Rendered]) -> None:
    """Every service in the service list appears as a workload of its kind in every overlay."""
    kind_of = {"stateful": "StatefulSet", "stateless": "Deployment", "job": "Job"}
    for rendered in shipped.values():
        present = {(w["kind"], w["metadata"]["name"]) for w in workloads(rendered.docs)}
        wanted = {(kind_of[s.kind], s.name) for s in services().values()}
        assert present == wanted, rendered.id


# -- Network policy and monitoring --------------------------------------------------------------


def test_network_policy_follows_calls(renders: dict[str, Rendered]) -> None:
    """Default deny, and each service reachable on its gRPC port only from the services whose
    `calls` name it; egress only to what it calls, and DNS on port 53 to the resolvers (see
    manifests.peers). What these rules permit is checked by an analyser in
    test_network_analysis.py; this checks only that they are the graph's."""
    docs = next(r for r in renders.values() if r.components == ("network-policy",)).docs
    policies = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}
    assert policies["default-deny"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    for svc in services().values():
        dns = [
            r
            for r in policies[svc.name].get("egress", [])
            if any("ipBlock" in peer for peer in r["to"])
        ]
        assert [{p["port"] for p in r["ports"]} for r in dns] == ([{53}] if svc.calls else [])
        spec = policies[svc.name]
        callers = {
            peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
            for rule in spec.get("ingress", [])
            for peer in rule["from"]
            if "podSelector" in peer
        }
        assert callers == {c.name for c in services().values() if svc.name in c.calls}, svc.name
        callees = {
            peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
            for rule in spec.get("egress", [])
            for peer in rule.get("to", [])
            if "podSelector" in peer and "namespaceSelector" not in peer
        }
        assert callees == set(svc.calls), svc.name


# PodMonitoring is a GKE Managed Prometheus custom resource: kubernetes-validate has no schema
# for it. This is the subset of its CRD (monitoring.googleapis.com/v1) that we use, strict.
POD_MONITORING_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.googleapis.com/v1"},
        "kind": {"const": "PodMonitoring"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "matchLabels": {"type": "object"},
                        "matchExpressions": {"type": "array"},
                    },
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["port"],
                        "properties": {
                            "port": {"type": ["string", "integer"]},
                            "path": {"type": "string"},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "scheme": {"enum": ["http", "https"]},
                            "timeout": {"type": "string"},
                        },
                    },
                },
            },
        },
    },
}


def test_pod_monitoring_scrapes_every_long_running_service(shipped: dict[str, Rendered]) -> None:
    """The PodMonitoring (GKE overlay) matches our subset of its CRD schema and selects every
    long-running pod through a port named `metrics`, and no job pod."""
    import jsonschema  # type: ignore[import-untyped]  # ships no types

    docs = shipped["gke"].docs
    (monitor,) = [d for d in docs if d["kind"] == "PodMonitoring"]
    jsonschema.validate(monitor, POD_MONITORING_SCHEMA)
    selector = monitor["spec"]["selector"]
    (expression,) = selector["matchExpressions"]
    for w in workloads(docs):
        labels = w["spec"]["template"]["metadata"]["labels"]
        selected = all(labels.get(k) == v for k, v in selector["matchLabels"].items()) and (
            labels.get(expression["key"]) in expression["values"]
        )
        ports = {p["name"] for c in containers(w) for p in c.get("ports", [])}
        assert selected == (w["kind"] in LONG_RUNNING_KINDS), w["metadata"]["name"]
        if selected:
            assert monitor["spec"]["endpoints"][0]["port"] in ports


def test_images_per_overlay(shipped: dict[str, Rendered]) -> None:
    """minikube runs the locally loaded kvstack-NAME images; GKE pulls every one of them from
    Artifact Registry (REGION-docker.pkg.dev/PROJECT/REPO/NAME)."""
    for overlay, rendered in shipped.items():
        for w in workloads(rendered.docs):
            image = containers(w)[0]["image"].rpartition(":")[0]
            svc = services()[w["metadata"]["name"]]
            if overlay == "gke":
                assert image == f"{manifests.GKE_REGISTRY_PLACEHOLDER}/{svc.image}"
            elif overlay == "minikube":
                assert image == svc.image
