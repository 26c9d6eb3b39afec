"""Each overlay's NetworkPolicies, as rendered, checked by a real analyser against what runs.

network-config-analyzer (see tests/manifests/netpol.py for the model of the cluster and what it
cannot show) answers, for each overlay, one query per connection:
- permitted: every flow of the flow graph (kvstack.ops.catalog.flows), AND every connection in
  CODE_OPENS below, written out here from what the code does rather than from the graph, so a
  flow the graph forgets (as replication was) fails here instead of on a cluster;
- forbidden: the client to a backend, any pod of another namespace to a service (the metrics
  collectors only on the metrics port), a pod in the namespace without kvstack's labels to
  anything, a service to a port the graph does not give it, the metadata server's HTTP port.

On the manifests before the flow graph (main at 75d1733) this fails on replication
(backend-1 -> backend-0), on DNS that is not a kube-dns pod (NodeLocal DNSCache, Cloud DNS) and
on GKE's metrics collectors (gke-gmp-system).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kvstack import defaults
from kvstack.ops import catalog

from .netpol import (
    METADATA_IP,
    NODELOCAL_DNS_IP,
    Model,
    Pod,
    Query,
    connectivity,
    failed_queries,
    nca,
)
from .render import Rendered

SERVICES = catalog.services()


def code_opens(model: Model) -> list[Query]:
    """The connections the code opens, read from the code, not from the graph: the client
    calls the server (kvstack.client), the server calls every backend (writes to the primary,
    reads round-robin: kvstack.server, kvstack.directory), a replica calls the primary
    (Stream, Snapshot, Role: kvstack.backend.replication), every one of them resolves names,
    wherever the cluster answers DNS, and GKE's collectors scrape each service's metrics."""
    server, backend = SERVICES["server"], SERVICES["backend"]
    client_pod = model.of("client")[0]
    primary, *replicas = model.of("backend")
    out = [
        Query(client_pod, server.port, target=s, why="client -> server") for s in model.of("server")
    ]
    out += [
        Query(s, backend.port, target=b, why="server -> backend")
        for s in model.of("server")
        for b in model.of("backend")
    ]
    out += [Query(r, backend.port, target=primary, why="replication") for r in replicas]
    for pod in [client_pod, *model.of("server"), *model.of("backend")]:
        for proto in ("UDP", "TCP"):
            out.append(Query(pod, 53, proto, target=model.pod("kube-dns-0"), why="kube-dns"))
            out.append(Query(pod, 53, proto, target_ip=NODELOCAL_DNS_IP, why="NodeLocal DNS"))
            out.append(Query(pod, 53, proto, target_ip=METADATA_IP, why="Cloud DNS"))
    collector = model.pod("collector-0")
    out += [
        Query(collector, defaults.METRICS_PORT, target=p, why="metrics")
        for p in [*model.of("server"), *model.of("backend")]
    ]
    return out


def graph_flows(model: Model) -> list[Query]:
    """Every flow of the flow graph, between the modelled pods of its two ends."""

    def pods(end: str) -> list[Pod]:
        if end == catalog.METRICS_COLLECTOR:
            return [model.pod("collector-0")]
        return model.of(end)

    out = []
    for flow in catalog.flows(SERVICES):
        for src in pods(flow.caller):
            for proto in flow.protocols:
                if flow.callee == catalog.DNS:
                    out.append(Query(src, flow.port, proto, target=model.pod("kube-dns-0")))
                    out.append(Query(src, flow.port, proto, target_ip=NODELOCAL_DNS_IP))
                    continue
                out += [
                    Query(src, flow.port, proto, target=dst)
                    for dst in pods(flow.callee)
                    if dst != src
                ]
    return out


def must_not(model: Model) -> list[Query]:
    """Connections that must be refused."""
    server, backend = SERVICES["server"], SERVICES["backend"]
    services = [*model.of("server"), *model.of("backend")]
    client_pod = model.of("client")[0]
    out = [Query(client_pod, None, target=b) for b in model.of("backend")]
    out += [Query(model.pod("tenant-app-0"), None, target=p) for p in services]
    out += [Query(model.pod("debug-0"), None, target=p) for p in [*services, client_pod]]
    out += [Query(model.pod("debug-0"), 53, "UDP", target_ip=NODELOCAL_DNS_IP)]
    collector = model.pod("collector-0")
    out += [Query(collector, server.port, target=p) for p in model.of("server")]
    out += [Query(collector, backend.port, target=p) for p in model.of("backend")]
    out += [
        Query(b, server.port, target=s) for b in model.of("backend") for s in model.of("server")
    ]
    out += [Query(p, defaults.METRICS_PORT, target=q) for p in services for q in services if p != q]
    out += [Query(p, 80, target_ip=METADATA_IP) for p in [client_pod, *services]]
    out += [Query(p, 443, target_ip="203.0.113.7") for p in [client_pod, *services]]
    # DNS to the resolvers only: port 53 to any other address is a channel out of the cluster.
    out += [Query(p, 53, "TCP", target_ip="203.0.113.7") for p in [client_pod, *services]]
    out += [Query(p, 53, "UDP", target_ip="203.0.113.7") for p in [client_pod, *services]]
    return out


def analyse(rendered: Rendered, workdir: Path) -> tuple[Model, list[str], str]:
    model = Model(rendered.docs)
    assert model.policies, f"{rendered.id} renders no NetworkPolicy"
    permits = list({q.name: q for q in [*code_opens(model), *graph_flows(model)]}.values())
    scheme = model.write(workdir, permits, must_not(model))
    result = nca("--scheme", scheme.name, cwd=workdir)
    output = result.stdout + result.stderr
    if result.returncode and not failed_queries(output):
        pytest.fail(f"nca could not run the queries (exit {result.returncode}):\n{output[-3000:]}")
    return model, failed_queries(output), output


@pytest.mark.parametrize("overlay", ["minikube", "gke"])
def test_the_policies_permit_every_flow_and_refuse_the_rest(
    shipped: dict[str, Rendered], overlay: str, tmp_path: Path
) -> None:
    """Every flow the code opens and the graph declares is permitted, every one that must not
    exist is forbidden, on the overlay exactly as `kvstack deploy` renders it."""
    _, failed, output = analyse(shipped[overlay], tmp_path)
    assert not failed, f"{overlay}: the analyser disagrees on {len(failed)} connections:\n  " + (
        "\n  ".join(failed)
    )
    assert "Running query" in output


def test_the_analysis_catches_a_flow_missing_from_the_graph(
    shipped: dict[str, Rendered], tmp_path: Path
) -> None:
    """With replication's rule taken out of the backend's policy (as before the flow graph),
    the analyser reports exactly the replica -> primary connections as not permitted."""
    rendered = shipped["minikube"]
    docs = rendered.docs
    for doc in docs:
        if doc["kind"] == "NetworkPolicy" and doc["metadata"]["name"] == "backend":
            doc["spec"]["ingress"] = [
                rule
                for rule in doc["spec"]["ingress"]
                if rule.get("from", [{}])[0]
                .get("podSelector", {})
                .get("matchLabels", {})
                .get("app.kubernetes.io/name")
                != "backend"
            ]
    import yaml  # type: ignore[import-untyped]  # PyYAML ships no types

    broken = Rendered(rendered.overlay, rendered.components, yaml.safe_dump_all(docs))
    _, failed, _ = analyse(broken, tmp_path)
    assert set(failed) == {
        "permits-backend-1-to-backend-0-tcp-50061",  # what the code opens
        "permits-backend-0-to-backend-1-tcp-50061",  # what the graph's backend -> backend allows
    }


def test_every_component_object_names_its_namespace(shipped: dict[str, Rendered]) -> None:
    """Plain `kubectl apply -k` of an overlay puts every namespaced object in kvstack's
    namespace, not the context's (the components are outside the base's `namespace:`)."""
    for overlay, rendered in shipped.items():
        loose = [
            f"{d['kind']}/{d['metadata']['name']}"
            for d in rendered.docs
            if d["kind"] != "Namespace" and d["metadata"].get("namespace") != "kvstack"
        ]
        assert not loose, f"{overlay}: {loose} carry no namespace"


def test_connectivity_table_in_the_docs_is_the_analysers(
    shipped: dict[str, Rendered], tmp_path: Path
) -> None:
    """docs/deploying.md shows the connectivity table nca prints for the gke overlay."""
    model = Model(shipped["gke"].docs)
    model.write(tmp_path, [], [])
    table = connectivity(tmp_path)
    docs = (Path(__file__).resolve().parents[2] / "docs/deploying.md").read_text()
    assert table.strip() in docs, f"docs/deploying.md lacks the current table:\n{table}"
