"""A NetworkPolicy analyser's view of a rendered overlay: a modelled cluster and flow queries.

No Kubernetes cluster can run here, so the policies are checked with network-config-analyzer
(`nca`, from PyPI, offline): it computes which connections a set of NetworkPolicies permits
between the pods and namespaces it is given, with Kubernetes' semantics (default allow, a pod
selected by a policy is isolated in that direction, rules add up, ports and protocols).

The model stands in for a cluster: every pod the rendered workloads would create, with the labels
Kubernetes gives them (a StatefulSet's `statefulset.kubernetes.io/pod-name` and
`apps.kubernetes.io/pod-index`, a Job's `batch.kubernetes.io/job-name`), plus what the platform
runs: kube-dns in kube-system, GKE Managed Prometheus's collector in gke-gmp-system, a pod of
another tenant's namespace and a stray pod in kvstack's namespace without kvstack's labels. Each
modelled pod carries MODEL_LABEL with its name, which no real policy selects, so that a query can
name one pod. DNS answered on the node's host network (NodeLocal DNSCache, Cloud DNS at the
metadata server) is an IP address, not a pod: queries name it with an ipBlock.

What it cannot show: whether the cluster's network plugin enforces policies at all (GKE
Dataplane V2 and Calico do; minikube's default does not), how a plugin treats traffic to a
Service's virtual IP, and anything at run time (the services really opening these connections is
what the Swarm tests show, on networks rendered from the same graph).
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]  # PyYAML ships no types

MODEL_LABEL = "model.kvstack.dev/pod"
NAMESPACE_LABEL = "kubernetes.io/metadata.name"
PLATFORM_NAMESPACES = {
    "kube-system": [("kube-dns-0", {"k8s-app": "kube-dns"})],
    "gke-gmp-system": [("collector-0", {"app.kubernetes.io/name": "collector"})],
    "tenant": [("tenant-app-0", {"app": "tenant"})],
}
STRAY_POD = ("debug-0", {"app": "debug"})  # in kvstack's namespace, no kvstack labels
# Where DNS answers when it is not a pod (the flow graph allows DNS by port for that reason).
NODELOCAL_DNS_IP = "169.254.20.10"  # NodeLocal DNSCache's link-local address
METADATA_IP = "169.254.169.254"  # GKE's metadata server: Cloud DNS on port 53, HTTP on 80


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    labels: dict[str, str]

    def doc(self, ip: str) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "labels": {**self.labels, MODEL_LABEL: self.name},
            },
            "spec": {"containers": [{"name": "c", "image": "x"}]},
            "status": {"podIP": ip, "hostIP": "10.128.0.2"},
        }


def workload_pods(docs: list[dict[str, Any]]) -> list[Pod]:
    """The pods the rendered workloads would run, labelled as their controllers label them."""
    pods = []
    for doc in docs:
        kind, meta = doc["kind"], doc["metadata"]
        if kind not in ("StatefulSet", "Deployment", "Job"):
            continue
        labels = dict(doc["spec"]["template"]["metadata"]["labels"])
        count = 1 if kind == "Job" else max(2, int(doc["spec"].get("replicas", 2)))
        for i in range(count):
            name = f"{meta['name']}-{i}"
            extra: dict[str, str] = {}
            if kind == "StatefulSet":
                extra = {
                    "statefulset.kubernetes.io/pod-name": name,
                    "apps.kubernetes.io/pod-index": str(i),
                }
            elif kind == "Job":
                extra = {"batch.kubernetes.io/job-name": meta["name"]}
            pods.append(Pod(name, meta["namespace"], {**labels, **extra}))
    return pods


@dataclass(frozen=True)
class Query:
    """One connection that must be permitted (or forbidden): from a pod to a pod or an IP."""

    source: Pod
    port: int | None  # None: every port
    protocol: str = "TCP"
    target: Pod | None = None
    target_ip: str | None = None
    why: str = ""

    @property
    def name(self) -> str:
        dst = self.target.name if self.target else self.target_ip
        port = f"{self.protocol.lower()}-{self.port}" if self.port else "any-port"
        return f"{self.source.name}-to-{dst}-{port}"

    def policy(self) -> dict[str, Any]:
        """A NetworkPolicy that allows exactly this connection: what nca's permits/forbids take."""
        ports = [{"protocol": self.protocol, "port": self.port}] if self.port else []
        rule: dict[str, Any] = {"ports": ports} if ports else {}
        if self.target is not None:
            rule["from"] = [
                {
                    "namespaceSelector": {"matchLabels": {NAMESPACE_LABEL: self.source.namespace}},
                    "podSelector": {"matchLabels": {MODEL_LABEL: self.source.name}},
                }
            ]
            return {
                "apiVersion": "networking.k8s.io/v1",
                "kind": "NetworkPolicy",
                "metadata": {"name": self.name, "namespace": self.target.namespace},
                "spec": {
                    "podSelector": {"matchLabels": {MODEL_LABEL: self.target.name}},
                    "policyTypes": ["Ingress"],
                    "ingress": [rule],
                },
            }
        rule["to"] = [{"ipBlock": {"cidr": f"{self.target_ip}/32"}}]
        return {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": self.name, "namespace": self.source.namespace},
            "spec": {
                "podSelector": {"matchLabels": {MODEL_LABEL: self.source.name}},
                "policyTypes": ["Egress"],
                "egress": [rule],
            },
        }


@dataclass
class Model:
    """The modelled cluster for one rendered overlay."""

    docs: list[dict[str, Any]]
    pods: list[Pod] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.pods = workload_pods(self.docs)
        namespace = self.namespace
        self.pods.append(Pod(STRAY_POD[0], namespace, STRAY_POD[1]))
        for ns, pods in PLATFORM_NAMESPACES.items():
            self.pods += [Pod(name, ns, labels) for name, labels in pods]

    @property
    def namespace(self) -> str:
        (ns,) = {d["metadata"]["name"] for d in self.docs if d["kind"] == "Namespace"}
        return str(ns)

    @property
    def policies(self) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == "NetworkPolicy"]

    def pod(self, name: str) -> Pod:
        return next(p for p in self.pods if p.name == name)

    def of(self, app: str) -> list[Pod]:
        """The modelled pods of one kvstack service."""
        return [
            p
            for p in self.pods
            if p.namespace == self.namespace and p.labels.get("app.kubernetes.io/name") == app
        ]

    def write(self, workdir: Path, permits: list[Query], forbids: list[Query]) -> Path:
        """The input files and a scheme of one query per connection; the scheme's path."""
        workdir.mkdir(parents=True, exist_ok=True)
        namespaces = {p.namespace for p in self.pods}
        pods = [p.doc(f"10.0.{i // 250}.{i % 250 + 2}") for i, p in enumerate(self.pods)]
        dump_list(workdir / "pods.yaml", "PodList", pods)
        dump_list(
            workdir / "namespaces.yaml",
            "NamespaceList",
            [
                {"apiVersion": "v1", "kind": "Namespace",
                 "metadata": {"name": ns, "labels": {NAMESPACE_LABEL: ns}}}
                for ns in sorted(namespaces)
            ],
        )  # fmt: skip
        (workdir / "policies.yaml").write_text(yaml.safe_dump_all(self.policies))
        configs = [{"name": "kvstack", "networkPolicyList": ["policies.yaml"]}]
        queries = []
        for verb, batch in (("permits", permits), ("forbids", forbids)):
            for q in batch:
                spec = workdir / f"{verb}-{q.name}.yaml"
                spec.write_text(yaml.safe_dump(q.policy()))
                configs.append({"name": f"{verb}-{q.name}", "networkPolicyList": [spec.name]})
                queries.append(
                    {
                        "name": f"{verb}-{q.name}",
                        verb: ["kvstack", f"{verb}-{q.name}"],
                        "expected": 0,
                    }
                )
        scheme = {
            "namespaceList": "namespaces.yaml",
            "podList": "pods.yaml",
            "networkConfigList": configs,
            "queries": queries,
        }
        path = workdir / "scheme.yaml"
        path.write_text(yaml.safe_dump(scheme, sort_keys=False))
        return path


def dump_list(path: Path, kind: str, items: list[dict[str, Any]]) -> None:
    path.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": kind, "items": items}))


def nca(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the analyser (installed with the dev tools, beside this interpreter)."""
    exe = Path(sys.executable).with_name("nca")
    return subprocess.run(
        [str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=600, check=False
    )


def failed_queries(output: str) -> list[str]:
    """The names of the scheme's queries whose answer was not the expected one."""
    return re.findall(r"Unexpected result for query (\S+):", output)


def connectivity(workdir: Path) -> str:
    """The analyser's connectivity table (Markdown) of the policies over the modelled pods."""
    result = nca(
        "--connectivity", "policies.yaml", "--pod_list", "pods.yaml",
        "--ns_list", "namespaces.yaml", "--output_format", "md", cwd=workdir,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("|")]
    assert len(rows) > 3, f"no connectivity table in nca's output:\n{result.stdout}"
    return "\n".join(r for r in rows if "config:" not in r)
