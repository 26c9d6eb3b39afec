"""The whole system on the local Docker engine: `kvstack up` and `kvstack down`.

Swarm mode does the running (replicas, restart on crash, health-gated rolling updates); the stack
file is generated from the service registry into build/, never written by hand. Only the
services marked `publish` get a host port, in mode host (the ingress mesh does not work on the
project's machines) with a port picked by the engine per task, so that several replicas and a
start-first update fit on one node. The client runs as a `docker run` container on the stack's
attachable network, which needs no published port at all.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from kvstack import registry
from kvstack.cli import CommandError
from kvstack.ops import engine, images
from kvstack.ops.engine import docker
from kvstack.ops.shell import Runner, say

DEFAULT_STACK = "kvstack"
BUILD_DIR = images.ROOT / "build"
NETWORK = "net"
DATA_DIR = "/data"
HEALTHY_TIMEOUT_S = 180.0
# `python -m kvstack.probe` asks the service's own gRPC health endpoint (port from the image's
# KVSTACK_SERVICE); it exits 0 only on SERVING.
PROBE = ["CMD", "/opt/venv/bin/python", "-m", "kvstack.probe"]


def network_name(stack: str) -> str:
    return f"{stack}_{NETWORK}"


def service_name(stack: str, service: registry.Service) -> str:
    return f"{stack}_{service.name}"


def volume_name(service: registry.Service) -> str:
    return f"{service.name}-data"


def callee_targets(service: registry.Service) -> dict[str, str]:
    """KVSTACK_<CALLEE>_TARGET for each service it calls: the callee's name on the stack's
    network, resolved to every task's address (dnsrr) for client-side round robin."""
    return {
        f"KVSTACK_{callee.upper()}_TARGET": f"dns:///{callee}:{registry.get(callee).port}"
        for callee in service.calls
    }


def _service_spec(service: registry.Service, tag: str) -> dict[str, Any]:
    stateful = service.kind == "stateful"
    spec: dict[str, Any] = {
        "image": images.image_ref(service, tag),
        "environment": callee_targets(service),
        "networks": [NETWORK],
        "healthcheck": {
            "test": PROBE,
            "interval": "3s",
            "timeout": "3s",
            "retries": 3,
            "start_period": "30s",
        },
        "stop_grace_period": "20s",
        "deploy": {
            # dnsrr: the name resolves to every task's address, for client-side balancing.
            "endpoint_mode": "dnsrr",
            "replicas": service.replicas,
            "restart_policy": {"condition": "any", "delay": "1s"},
            # A stateful service has one writer per volume: stop the old task first. Others
            # start the new task, wait for it to be healthy, then stop an old one.
            "update_config": {
                "parallelism": 1,
                "order": "stop-first" if stateful else "start-first",
                "failure_action": "rollback",
                "monitor": "10s",
            },
            "rollback_config": {
                "parallelism": 1,
                "order": "stop-first" if stateful else "start-first",
            },
            "labels": {"dev.kvstack.service": service.name},
        },
    }
    if stateful:
        spec["volumes"] = [f"{volume_name(service)}:{DATA_DIR}"]
    if service.publish and service.port:
        spec["ports"] = [{"target": service.port, "protocol": "tcp", "mode": "host"}]
    return spec


def stack_spec(tag: str) -> dict[str, Any]:
    """The compose v3.8 stack of every long-running service in the registry."""
    long_running = [s for s in registry.services().values() if s.long_running]
    return {
        "version": "3.8",
        "services": {s.name: _service_spec(s, tag) for s in long_running},
        "networks": {NETWORK: {"driver": "overlay", "attachable": True}},
        "volumes": {volume_name(s): {} for s in long_running if s.kind == "stateful"},
    }


def write_stack_file(stack: str, tag: str) -> Path:
    # JSON is YAML, and needs no YAML library in the ops CLI.
    BUILD_DIR.mkdir(exist_ok=True)
    path = BUILD_DIR / f"{stack}.stack.json"
    path.write_text(json.dumps(stack_spec(tag), indent=2) + "\n")
    return path


def _healthy_counts(runner: Runner, stack: str, tag: str) -> dict[str, tuple[int, int]]:
    """Per long-running service: (healthy tasks on the expected image, replicas wanted)."""
    counts = {}
    for service in registry.services().values():
        if not service.long_running:
            continue
        name = service_name(stack, service)
        ps = runner.query(
            docker(
                "ps",
                "--filter",
                f"label=com.docker.swarm.service.name={name}",
                "--filter",
                "health=healthy",
                "--format",
                "{{.Image}}",
            )
        )
        healthy = ps.stdout.split().count(images.image_ref(service, tag))
        updating = runner.query(
            docker(
                "service",
                "inspect",
                "--format",
                "{{if .UpdateStatus}}{{.UpdateStatus.State}}{{end}}",
                name,
            )
        ).stdout.strip()
        if updating in ("updating", "rollback_started"):
            healthy = min(healthy, service.replicas - 1)
        counts[service.name] = (healthy, service.replicas)
    return counts


def wait_healthy(runner: Runner, stack: str, tag: str, timeout: float = HEALTHY_TIMEOUT_S) -> None:
    """Wait until every replica of every long-running service is healthy on this tag."""
    if runner.dry_run:
        return
    deadline = time.monotonic() + timeout
    shown = ""
    while True:
        counts = _healthy_counts(runner, stack, tag)
        status = ", ".join(f"{n} {h}/{w}" for n, (h, w) in counts.items())
        if all(h >= w for h, w in counts.values()):
            say(f"healthy: {status}")
            return
        if time.monotonic() > deadline:
            raise CommandError(
                f"not healthy after {timeout:.0f} s ({status}); see `docker stack ps {stack} "
                f"--no-trunc` and `docker service logs {stack}_SERVICE`"
            )
        if status != shown:
            say(f"waiting for healthy replicas: {status}")
            shown = status
        time.sleep(2)


def deploy(runner: Runner, stack: str, tag: str) -> None:
    """Deploy (or update in place) the stack on this tag; idempotent."""
    engine.ensure_swarm(runner)
    path = write_stack_file(stack, tag)
    say(f"deploying stack {stack} ({path.relative_to(images.ROOT)})")
    runner.run(
        docker(
            "stack",
            "deploy",
            "--prune",
            "--resolve-image",
            "never",
            "--compose-file",
            str(path),
            stack,
        )
    )


def published_ports(runner: Runner, stack: str) -> list[str]:
    """host:port of every published task port, e.g. 127.0.0.1:30001 (for the person)."""
    found = []
    for service in registry.services().values():
        if not (service.publish and service.long_running):
            continue
        ids = runner.query(
            docker(
                "ps",
                "-q",
                "--filter",
                f"label=com.docker.swarm.service.name={service_name(stack, service)}",
            )
        ).stdout.split()
        for cid in ids:
            port = runner.query(docker("port", cid, f"{service.port}/tcp")).stdout.split()
            found += [f"{service.name} 127.0.0.1:{p.rsplit(':', 1)[-1]}" for p in port[:1]]
    return found


def run_job(runner: Runner, stack: str, tag: str, name: str, args: list[str]) -> int:
    """Run a job service (the client) once, as a container on the stack's network."""
    service = registry.get(name)
    env = [f"--env={k}={v}" for k, v in callee_targets(service).items()]
    argv = docker(
        "run", "--rm", "--network", network_name(stack), *env, images.image_ref(service, tag), *args
    )
    return runner.run(argv, check=False).returncode


def remove(runner: Runner, stack: str, *, volumes: bool, timeout: float = 90) -> None:
    """Remove the stack and wait until its containers and network are gone."""
    label = f"label=com.docker.stack.namespace={stack}"
    if runner.query(docker("stack", "ps", "-q", stack)).returncode == 0:
        runner.run(docker("stack", "rm", stack))
    deadline = time.monotonic() + timeout
    while not runner.dry_run and time.monotonic() < deadline:
        left = runner.query(docker("ps", "-aq", "--filter", label)).stdout.split()
        net = runner.query(docker("network", "ls", "-q", "--filter", label)).stdout.split()
        if not left and not net:
            break
        time.sleep(1)
    if volumes:
        vols = runner.query(docker("volume", "ls", "-q", "--filter", label)).stdout.split()
        if vols:
            runner.run(docker("volume", "rm", *vols))
    else:
        say("data volumes kept (kvstack down --volumes removes them)")


def _cmd_up(args: argparse.Namespace) -> int:
    runner = Runner(dry_run=args.dry_run)
    engine.ensure(runner)
    tag = args.tag or images.version()
    images.build(runner, list(registry.services().values()), tag, only_if_changed=True)
    deploy(runner, args.stack, tag)
    wait_healthy(runner, args.stack, tag)
    for line in published_ports(runner, args.stack):
        say(f"published: {line}")
    if args.no_client:
        return 0
    for job in (s for s in registry.services().values() if s.kind == "job"):
        say(f"running {job.name} on network {network_name(args.stack)}")
        code = run_job(runner, args.stack, tag, job.name, [])
        if code != 0:
            raise CommandError(
                f"{job.name} exited {code}; see its output above and "
                f"`docker service logs {args.stack}_server`"
            )
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    runner = Runner(dry_run=args.dry_run)
    if not engine.answers(runner):
        say("no Docker engine answers: nothing to remove")
        return 0
    remove(runner, args.stack, volumes=args.volumes)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    up = sub.add_parser("up", help="build, deploy the local stack (Swarm), run the client")
    up.add_argument("--stack", default=DEFAULT_STACK, help="stack name (default: %(default)s)")
    up.add_argument("--tag", help="image tag to build and deploy (default: from git describe)")
    up.add_argument("--no-client", action="store_true", help="do not run the client at the end")
    up.add_argument("--dry-run", action="store_true", help="print the commands, run none")
    up.set_defaults(func=_cmd_up)
    down = sub.add_parser("down", help="remove the local stack (keeps its data volume)")
    down.add_argument("--stack", default=DEFAULT_STACK, help="stack name (default: %(default)s)")
    down.add_argument("--volumes", action="store_true", help="also remove its data volumes")
    down.add_argument("--dry-run", action="store_true", help="print the commands, run none")
    down.set_defaults(func=_cmd_down)
