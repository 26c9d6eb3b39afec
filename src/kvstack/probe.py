"""`python -m kvstack.probe`: the image's own health check (Docker HEALTHCHECK, Swarm).

Asks the gRPC health service of the service in this container and exits 0 only when it says
SERVING. Kubernetes does not need it: it probes gRPC health natively.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvstack import registry


def default_port() -> int:
    if os.environ.get("KVSTACK_PORT"):
        return int(os.environ["KVSTACK_PORT"])
    service = registry.get(os.environ.get("KVSTACK_SERVICE", "server"))
    return service.port or 0


def check(target: str, timeout: float, service: str = "") -> str:
    """The serving status name, or the gRPC error code name when the check itself failed."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as err:
            return str(err.code().name)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvstack.probe", description=__doc__)
    parser.add_argument(
        "--target", default=None, help="host:port (default: this container's service on localhost)"
    )
    parser.add_argument("--timeout", type=float, default=2.0)
    parser.add_argument(
        "--service",
        default="",
        help='the health name to ask (default "": the process as a whole; a service may say '
        "NOT_SERVING for one of its APIs, e.g. a backend replica for kvstack.v1.KeyValue)",
    )
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    target = args.target or f"localhost:{default_port()}"
    status = check(target, args.timeout, args.service)
    if not args.quiet:
        print(f"{target}{' ' + args.service if args.service else ''}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
