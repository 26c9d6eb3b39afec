"""The service catalog: the list of services (services.toml beside this file) loaded into
typed records, with each long-running one's port from kvstack.defaults.

Everything that differs from one service to another (its kind, replica count, what it calls,
its port) is read from here by the deploy: the images, the local Swarm stack, the Kubernetes
manifests and the CI matrix. Nothing else spells those facts out again. The running services
never read this list (they take their port and their callees' addresses from kvstack.defaults),
so it is no image's input: editing a replica count rebuilds nothing.
"""

from __future__ import annotations

import ast
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Literal

from kvstack import defaults

SERVICES_FILE = Path(__file__).with_name("services.toml")
# The two files in a source tree (the deploy renders a tree's; `kvstack new-service` edits both),
# and the PORTS table in the second: its opening line, its entries, its closing brace.
SERVICES_PATH = "src/kvstack/ops/services.toml"
DEFAULTS_PATH = "src/kvstack/defaults.py"
PORTS_TABLE = re.compile(r"^PORTS: dict\[str, int\] = \{\n((?:    .*\n)*?)\}$", re.M)
Kind = Literal["stateful", "stateless", "job"]
KINDS: tuple[Kind, ...] = ("stateful", "stateless", "job")

IMAGE_PREFIX = "kvstack-"
# How many replicas of a long-running service: at least 2, so one can fail or roll without an
# outage (the brief's resiliency floor), at most 5, what the project is sized and tested for
# (`kvstack scale` refuses others unless --force; the server's autoscaler stops at the ceiling).
MIN_REPLICAS = 2
MAX_REPLICAS = 5
# The only writable path besides a stateful service's data: /tmp, in memory, this size (the
# pods' emptyDir sizeLimit, the Swarm tasks' tmpfs), since every root file system is read-only.
TMP_BYTES = 64 * 2**20
# The non-root user every image runs as (set in the Dockerfile, required by the manifests).
RUNTIME_UID = 65532
# The arguments a job runs with as a deploy's smoke test, on every target (the local stack's
# `docker run`, the Kubernetes Job): the client's check of every tier (kvstack.client.run_smoke).
SMOKE_ARGS = ("smoke",)


class ServiceListError(ValueError):
    """The service list (or the PORTS it takes from kvstack.defaults) is wrong; the message
    says what, and which file to fix."""


@dataclass(frozen=True)
class Service:
    name: str
    kind: Kind
    port: int | None = None
    replicas: int = 1
    calls: tuple[str, ...] = field(default_factory=tuple)
    publish: bool = False
    # The gRPC health name that says whether it can serve ("" is the process as a whole):
    # readiness probes and the Swarm health check ask this one; startup and liveness ask "".
    readiness: str = ""

    @property
    def long_running(self) -> bool:
        return self.kind != "job"

    @property
    def image(self) -> str:
        """The image's repository name, without registry or tag."""
        return IMAGE_PREFIX + self.name

    @property
    def target(self) -> str:
        """How callers reach it: a DNS name that resolves to every replica, on its port."""
        return f"dns:///{self.name}:{self.port}"

    @property
    def module(self) -> str:
        """The Python module that runs this service (its `main(argv)` is the entry point)."""
        return f"kvstack.{self.name}"


def parse(
    text: str, source: str = "services.toml", ports: Mapping[str, int] = defaults.PORTS
) -> dict[str, Service]:
    """Parse and check a services.toml document, with each long-running service's port from
    `ports` (kvstack.defaults.PORTS); raise ValueError saying what to fix."""
    data = tomllib.loads(text)
    services: dict[str, Service] = {}
    for name, raw in data.get("services", {}).items():
        kind = raw.get("kind")
        if kind not in KINDS:
            raise ServiceListError(
                f"{source}: service {name!r} has kind {kind!r}; use one of {KINDS}"
            )
        if "port" in raw:
            raise ServiceListError(
                f"{source}: service {name!r} sets `port`; a service's port is the service's own "
                "default: set it in kvstack.defaults.PORTS (src/kvstack/defaults.py) instead"
            )
        port = ports.get(name)
        if kind != "job" and port is None:
            raise ServiceListError(
                f"{source}: service {name!r} is {kind} and has no port: add it to "
                "kvstack.defaults.PORTS (src/kvstack/defaults.py)"
            )
        if kind == "job" and port is not None:
            raise ServiceListError(
                f"{source}: service {name!r} is a job, which serves no port, yet "
                f"kvstack.defaults.PORTS gives it {port}: remove that line"
            )
        replicas = int(raw.get("replicas", 1))
        if kind != "job" and not MIN_REPLICAS <= replicas <= MAX_REPLICAS:
            raise ServiceListError(
                f"{source}: service {name!r} has replicas = {replicas}; a long-running service "
                f"runs {MIN_REPLICAS} to {MAX_REPLICAS}"
            )
        services[name] = Service(
            name=name,
            kind=kind,
            port=port,
            replicas=replicas,
            calls=tuple(raw.get("calls", ())),
            publish=bool(raw.get("publish", False)),
            readiness=str(raw.get("readiness", "")),
        )
    unlisted = sorted(set(ports) - set(services))
    if unlisted:
        raise ServiceListError(
            f"{source} lists no service {', '.join(map(repr, unlisted))}, which "
            "kvstack.defaults.PORTS gives a port: list it here, or remove its port there"
        )
    if len([s for s in services.values() if s.publish]) > 1:
        raise ServiceListError(
            f"{source}: at most one service may `publish` (it gets the one address)"
        )
    for svc in services.values():
        for callee in svc.calls:
            if callee not in services:
                raise ServiceListError(f"{source}: {svc.name!r} calls unknown service {callee!r}")
            if services[callee].kind == "job":
                raise ServiceListError(
                    f"{source}: {svc.name!r} calls {callee!r}, a job: it serves no port"
                )
    return services


@cache
def services() -> dict[str, Service]:
    """Every service, by name, in the order services.toml lists them."""
    return parse(SERVICES_FILE.read_text(), str(SERVICES_FILE))


def ports_in(defaults_text: str) -> dict[str, int]:
    """The PORTS table of a kvstack/defaults.py's text (a tree's, not the imported module's)."""
    table = PORTS_TABLE.search(defaults_text)
    if table is None:
        raise ServiceListError(f"{DEFAULTS_PATH} has no `PORTS: dict[str, int] = {{...}}` table")
    ports = ast.literal_eval("{" + table.group(1) + "}")
    assert isinstance(ports, dict)
    return ports


def of_tree(
    root: Path, services_text: str | None = None, defaults_text: str | None = None
) -> dict[str, Service]:
    """The service list of the source tree at `root`, or the one these texts of its two files
    would give it."""
    if services_text is None:
        services_text = (root / SERVICES_PATH).read_text(encoding="utf-8")
    if defaults_text is None:
        defaults_text = (root / DEFAULTS_PATH).read_text(encoding="utf-8")
    return parse(services_text, SERVICES_PATH, ports_in(defaults_text))


def callees_first(services: Mapping[str, Service]) -> list[Service]:
    """Every service, each after the services it calls (a call to itself aside): the order in
    which rollouts are awaited, so a caller never waits on a callee that is not there yet."""
    ordered: list[Service] = []

    def visit(svc: Service) -> None:
        if svc in ordered:
            return
        for callee in svc.calls:
            if callee != svc.name:
                visit(services[callee])
        ordered.append(svc)

    for svc in services.values():
        visit(svc)
    return ordered


def rollout_order() -> list[Service]:
    """The long-running services, callees first: the order every target awaits rollouts in."""
    return [s for s in callees_first(services()) if s.long_running]


# -- The flow graph -------------------------------------------------------------------------------
#
# Every network flow the running system needs: the calls between services (services.toml) and two
# the platform brings, DNS (every pod resolves its callees' names) and metrics scraping (a
# collector outside the namespace reads defaults.METRICS_PORT). The Kubernetes NetworkPolicies
# (kvstack.ops.manifests) and the local Swarm stack's networks (kvstack.ops.local) are both
# rendered from flows() and allow nothing else; tests/manifests/test_network_analysis.py checks
# the policies with a NetworkPolicy analyser against this graph AND against its own list of what
# the code opens, so a flow forgotten here shows up as a refused connection, not a silent gap.

DNS = "dns"  # the cluster's resolver, whatever answers it (kube-dns, NodeLocal DNSCache, Cloud DNS)
METRICS_COLLECTOR = "metrics-collector"  # GKE Managed Prometheus's collectors
PLATFORM_PEERS = (DNS, METRICS_COLLECTOR)
DNS_PORT = 53


@dataclass(frozen=True)
class Flow:
    """One allowed flow: `caller` opens connections to `callee` on `port`. Either end is a
    service's name or a platform peer (DNS, METRICS_COLLECTOR)."""

    caller: str
    callee: str
    port: int
    protocols: tuple[str, ...]
    why: str

    @property
    def between_services(self) -> bool:
        return self.caller not in PLATFORM_PEERS and self.callee not in PLATFORM_PEERS


def flows(services: Mapping[str, Service]) -> list[Flow]:
    """The flow graph: every connection the running services open or accept."""
    out: list[Flow] = []
    for svc in services.values():
        for name in svc.calls:
            callee = services[name]
            assert callee.port is not None  # parse() requires a port of every long-running one
            why = "replicas reach the primary" if name == svc.name else "gRPC calls"
            out.append(Flow(svc.name, name, callee.port, ("TCP",), why))
    for svc in services.values():
        if svc.calls:  # it resolves its callees' names; a service that calls nothing resolves none
            out.append(Flow(svc.name, DNS, DNS_PORT, ("UDP", "TCP"), "name lookups"))
    for svc in services.values():
        if svc.long_running:
            out.append(
                Flow(METRICS_COLLECTOR, svc.name, defaults.METRICS_PORT, ("TCP",), "metrics")
            )
    return out


def get(name: str) -> Service:
    try:
        return services()[name]
    except KeyError:
        known = ", ".join(services())
        raise KeyError(f"unknown service {name!r}; known services: {known}") from None
