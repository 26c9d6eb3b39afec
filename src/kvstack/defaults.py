"""What the running services and their deploy share, defined once: where each long-running
service listens (so where its callers find it by default), the metrics port, the drain after
SIGTERM, the data directory.

The services read these and nothing else of the deploy. The service list
(src/kvstack/ops/services.toml: kinds, replica counts, the flow graph) is an input of the
deploy only, read by kvstack.ops.catalog, which takes each service's port from here; no image
holds it, so editing a replica count rebuilds and rolls out nothing.
"""

from __future__ import annotations

# Each long-running service's gRPC port (a job serves none). `kvstack new-service` adds a line.
PORTS: dict[str, int] = {
    "backend": 50061,
    "server": 50051,
}
# Shared by every long-running service: probes, manifests and the stack read it here.
METRICS_PORT = 9464
# Seconds a service lets its calls in flight finish after SIGTERM (KVSTACK_SHUTDOWN_GRACE's
# default); the deploy model (kvstack.ops.model) sizes the grace period before SIGKILL around it.
DRAIN_SECONDS = 10
# Where a stateful service keeps its data: its volume's mount point and KVSTACK_DATA_DIR's
# default (the Dockerfile creates it, owned by the runtime user, so a fresh volume mounted there
# is too).
DATA_DIR = "/data"


def port(name: str) -> int:
    """The port service `name` listens on; KeyError names the services that have one."""
    try:
        return PORTS[name]
    except KeyError:
        raise KeyError(
            f"no port for service {name!r} in kvstack.defaults.PORTS (it has: {', '.join(PORTS)})"
        ) from None


def target(name: str) -> str:
    """How callers reach service `name`: its DNS name, which resolves to every replica (the
    Kubernetes Service's, the Swarm service's), on its port."""
    return f"dns:///{name}:{port(name)}"
