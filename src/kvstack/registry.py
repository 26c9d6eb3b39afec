"""The one list of services (services.toml beside this file), loaded into typed records.

Everything that differs from one service to another (its port, kind, replica count, what it
calls) is read from here: the service code for its default port, the local Swarm stack, the
Kubernetes manifests and the CI matrix. Nothing else spells those facts out again.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Literal

REGISTRY_PATH = Path(__file__).with_name("services.toml")
Kind = Literal["stateful", "stateless", "job"]
KINDS: tuple[Kind, ...] = ("stateful", "stateless", "job")

# Shared by every long-running service; one place so probes, manifests and the stack agree.
METRICS_PORT = 9464
IMAGE_PREFIX = "kvstack-"
# The non-root user every image runs as (set in the Dockerfile, required by the manifests).
RUNTIME_UID = 65532
# The arguments a job runs with as a deploy's smoke test, on every target (the local stack's
# `docker run`, the Kubernetes Job): the client's check of every tier (kvstack.client.run_smoke).
SMOKE_ARGS = ("smoke",)


@dataclass(frozen=True)
class Service:
    name: str
    kind: Kind
    port: int | None = None
    replicas: int = 1
    calls: tuple[str, ...] = field(default_factory=tuple)
    publish: bool = False

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


def parse(text: str, source: str = "services.toml") -> dict[str, Service]:
    """Parse and check a services.toml document; raise ValueError saying what to fix."""
    data = tomllib.loads(text)
    services: dict[str, Service] = {}
    for name, raw in data.get("services", {}).items():
        kind = raw.get("kind")
        if kind not in KINDS:
            raise ValueError(f"{source}: service {name!r} has kind {kind!r}; use one of {KINDS}")
        port = raw.get("port")
        if kind != "job" and not isinstance(port, int):
            raise ValueError(f"{source}: service {name!r} is {kind} and needs an integer port")
        services[name] = Service(
            name=name,
            kind=kind,
            port=port,
            replicas=int(raw.get("replicas", 1)),
            calls=tuple(raw.get("calls", ())),
            publish=bool(raw.get("publish", False)),
        )
    for svc in services.values():
        for callee in svc.calls:
            if callee not in services:
                raise ValueError(f"{source}: {svc.name!r} calls unknown service {callee!r}")
    return services


@cache
def services() -> dict[str, Service]:
    """Every service, by name, in the order services.toml lists them."""
    return parse(REGISTRY_PATH.read_text(), str(REGISTRY_PATH))


def get(name: str) -> Service:
    try:
        return services()[name]
    except KeyError:
        known = ", ".join(services())
        raise KeyError(f"unknown service {name!r}; known services: {known}") from None
