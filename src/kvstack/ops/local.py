"""The whole system on the local Docker engine: `kvstack up` and `kvstack down`.

Swarm mode does the running (replicas, restart on crash, health-gated rolling updates); the stack
file is generated from the service list into build/, never written by hand. No Swarm
service publishes a port: Swarm binds a published port on every interface, whatever host IP the
stack file names (moby/moby#26696), and its ingress mesh does not work on the project's
machines. The service marked `publish` (the server) is reached from the host through a gateway
instead: a plain container running `kvstack.forward`, published on 127.0.0.1:50051 only
(KVSTACK_LOCAL_ADDRESS), on the network of its callers' flow (see kvstack.forward). The client
runs as a `docker run` container on the network of its flow to the server.

The networks follow the flow graph (kvstack.ops.catalog.flows), as the NetworkPolicies do on
Kubernetes: each flow between two services is its own overlay network, joined by those two
services only, so a container reaches another service only where the graph has a flow (the
client has no network in common with the backend, and its name does not even resolve there).
What Docker cannot express: a network is not directional and has no ports (the callee could open
a connection back to its caller), and the tasks of one service always share its networks (a flow
from a service to itself, like replication, needs no network of its own and gets one only when
the service has no other). The analyser in tests/manifests checks those finer rules for
Kubernetes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kvstack import defaults, forward
from kvstack.ops import catalog, engine, images, model
from kvstack.ops.engine import docker
from kvstack.ops.errors import CommandError
from kvstack.ops.shell import Runner, say
from kvstack.ops.targets import DeployRequest

DEFAULT_STACK = "kvstack"
STACK_VARIABLE = "KVSTACK_STACK"  # the stack every local verb works on, and the stack file's
TAG_VARIABLE = "KVSTACK_TAG"  # the image tag the committed stack file runs (see STACK_FILE)


def stack_name() -> str:
    """The stack every local verb works on: $KVSTACK_STACK, or kvstack (`--stack` overrides)."""
    return os.environ.get(STACK_VARIABLE, DEFAULT_STACK)


BUILD_DIR = images.ROOT / "build"
HEALTHY_TIMEOUT_S = 180.0
# `python -m kvstack.probe` asks the service's own gRPC health endpoint (port from the image's
# KVSTACK_SERVICE); it exits 0 only on SERVING.
PROBE = ["CMD", "/opt/venv/bin/python", "-m", "kvstack.probe"]
# Between two tasks of a rolling update or rollback. Callers balance over the tasks' addresses
# from DNS (dnsrr) and re-resolve at most once a second (the client's and the server's channel
# options); with gRPC's default of 30 s, replacing every replica faster than that left a caller
# with only dead addresses (see docs/deploying.md). The server finds backends through DNS too
# (its Directory: a lookup and a Role call each second): a backend task
# stopped the moment the one before it turned healthy could leave it, for a moment, with no
# backend it knew could answer a read (reasoned from the code, not seen: the reads that failed
# in backend rolling updates all came after a test had left a replica out of DNS). A short
# pause lets callers learn the new task before the next old one goes.
UPDATE_DELAY = "2s"
# Swarm numbers the tasks of a service from 1 (its slot); each task of a stateful service gets
# the volume and the ordinal of its slot, and slot 1 is the primary. Swarm scales down from the
# highest slot, so the primary and its volume stay.
SLOT = "{{.Task.Slot}}"
PRIMARY_SLOT = 1


def flow_network(flow: catalog.Flow) -> str:
    """The stack file's key of the network that carries one flow, e.g. `server-backend`."""
    return f"{flow.caller}-{flow.callee}"


def networks_of(
    service: catalog.Service, services: Mapping[str, catalog.Service] | None = None
) -> list[str]:
    """The stack file's keys of the networks `service` joins: one per flow between services it
    is an end of (see the module docstring for a flow from a service to itself)."""
    ends = [
        f
        for f in catalog.flows(services or catalog.services())
        if f.between_services and service.name in (f.caller, f.callee)
    ]
    others = [flow_network(f) for f in ends if f.caller != f.callee]
    return others or [flow_network(f) for f in ends]


def network_name(stack: str, key: str) -> str:
    """The engine's name of one of the stack's networks, e.g. kvstack_server-backend."""
    return f"{stack}_{key}"


def job_network(stack: str, job: catalog.Service) -> str:
    """The one network a job's container runs on: that of its flow to the service it calls
    (Docker 20.10's `docker run` joins one network, so a job calls one service locally)."""
    keys = networks_of(job)
    if len(keys) != 1:
        raise CommandError(
            f"the local target runs a job on one network, but {job.name} calls "
            f"{', '.join(job.calls) or 'nothing'}: give it exactly one service in `calls`"
        )
    return network_name(stack, keys[0])


def service_name(stack: str, service: catalog.Service) -> str:
    return f"{stack}_{service.name}"


def volume_name(service: catalog.Service) -> str:
    return f"{service.name}-data"


def slot_volume(stack: str, service: catalog.Service) -> str:
    """The engine's name of each task's volume: one per slot, e.g. kvstack_backend-data-1."""
    return f"{stack}_{volume_name(service)}-{SLOT}"


def callee_targets(service: catalog.Service) -> dict[str, str]:
    """KVSTACK_<CALLEE>_TARGET for each service a job calls (`docker run --env`)."""
    return {model.target_variable(callee): catalog.get(callee).target for callee in service.calls}


def service_spec(
    service: catalog.Service,
    tag: str,
    *,
    image: str | None = None,
    replicas: int | None = None,
    labels: dict[str, str] | None = None,
    services: Mapping[str, catalog.Service] | None = None,
) -> dict[str, Any]:
    """One service of the stack (kvstack.ops.model on Swarm); `image`, `replicas`, `labels`
    override the service list's values, `services` is the list to take the callees from (default:
    the tree's, catalog.services())."""
    stateful = service.kind == "stateful"
    order = "stop-first" if stateful else "start-first"
    health = model.SWARM_HEALTH
    spec: dict[str, Any] = {
        "image": image or images.image_ref(service, tag),
        "environment": {
            **model.environment(service, services or catalog.services()),
            **(
                {"KVSTACK_ORDINAL": SLOT, "KVSTACK_PRIMARY_ORDINAL": str(PRIMARY_SLOT)}
                if stateful
                else {}
            ),
        },
        "networks": networks_of(service, services),
        # As locked down as the pods where Swarm allows it: a read-only root with an in-memory
        # /tmp, no capabilities, the image's non-root user. (Swarm services take no
        # no-new-privileges option; with no capabilities and no setuid file in the image
        # there is no privilege to gain.)
        "read_only": True,
        "cap_drop": ["ALL"],
        # The one Swarm check (timings and why: kvstack.ops.model). --target spares the probe
        # reading services.toml (20 ms).
        "healthcheck": {
            "test": [
                *PROBE,
                "--target",
                f"127.0.0.1:{service.port}",
                "--timeout",
                str(model.PROBE_DEADLINE_SECONDS),
                "--service",
                service.readiness,
            ],
            "interval": f"{health.period}s",
            "timeout": f"{health.timeout}s",
            "retries": health.failures,
            "start_period": f"{model.STARTUP_SECONDS}s",
        },
        "stop_grace_period": f"{model.STOP_GRACE_SECONDS}s",
        "deploy": {
            # dnsrr: the name resolves to every task's address, for client-side balancing.
            "endpoint_mode": "dnsrr",
            "replicas": service.replicas if replicas is None else replicas,
            "restart_policy": {"condition": "any", "delay": "1s"},
            # A stateful service has one writer per volume: stop the old task first. Others
            # start the new task, wait for it to be healthy, then stop an old one.
            "update_config": {
                "parallelism": 1,
                "order": order,
                "failure_action": "rollback",
                "monitor": "10s",
                "delay": UPDATE_DELAY,
            },
            "rollback_config": {"parallelism": 1, "order": order, "delay": UPDATE_DELAY},
            "labels": {"dev.kvstack.service": service.name, **(labels or {})},
        },
    }
    tmp = {"type": "tmpfs", "target": "/tmp", "tmpfs": {"size": catalog.TMP_BYTES}}  # noqa: S108
    data = [f"{volume_name(service)}:{defaults.DATA_DIR}"] if stateful else []
    spec["volumes"] = [tmp, *data]
    return spec


def stack_spec(
    tag: str,
    services: dict[str, dict[str, Any]] | None = None,
    stack: str = DEFAULT_STACK,
    *,
    listed: Mapping[str, catalog.Service] | None = None,
) -> dict[str, Any]:
    """The compose v3.8 stack of every long-running service (`services`: ready service entries
    by name, as the local target's deploy computes them; `listed`: the service list, default
    the tree's, catalog.services())."""
    every = listed or catalog.services()
    long_running = [s for s in every.values() if s.long_running]
    given = services or {}
    return {
        "version": "3.8",
        "services": {
            s.name: given.get(s.name) or service_spec(s, tag, services=every) for s in long_running
        },
        # Attachable: the client (a job) and the tests' own containers join as `docker run`s.
        "networks": {
            key: {"driver": "overlay", "attachable": True}
            for key in dict.fromkeys(k for s in every.values() for k in networks_of(s, every))
        },
        "volumes": {
            volume_name(s): {"name": slot_volume(stack, s)}
            for s in long_running
            if s.kind == "stateful"
        },
    }


# The committed stack file (deploy/local/stack.yaml, written by `kvstack manifests`): the same
# rendering with compose's own interpolation where a deploy puts its values, so that
# `KVSTACK_STACK=NAME docker stack deploy -c deploy/local/stack.yaml NAME` runs the images
# `make images` tagged (KVSTACK_TAG, default latest) with volumes named after the stack.
# `docker stack deploy` interpolates ${VAR:-default} from the shell's environment (no .env):
# https://docs.docker.com/reference/compose-file/interpolation/,
# https://docs.docker.com/engine/reference/commandline/stack_config/ (the same interpolation
# `docker stack config` shows), moby/moby#29133 (stack deploy reads no .env, by design).
STACK_FILE = "deploy/local/stack.yaml"


def committed_stack(listed: Mapping[str, catalog.Service]) -> dict[str, Any]:
    """The stack file as committed: this tree's service list, tag and stack name left to
    `docker stack deploy`'s interpolation."""
    return stack_spec(
        f"${{{TAG_VARIABLE}:-{images.STABLE_TAG}}}",
        stack=f"${{{STACK_VARIABLE}:-{DEFAULT_STACK}}}",
        listed=listed,
    )


def write_stack_file(
    stack: str, tag: str, services: dict[str, dict[str, Any]] | None = None
) -> Path:
    # JSON is YAML, and needs no YAML library in the ops CLI.
    BUILD_DIR.mkdir(exist_ok=True)
    path = BUILD_DIR / f"{stack}.stack.json"
    path.write_text(json.dumps(stack_spec(tag, services, stack), indent=2) + "\n")
    return path


def deploy(
    runner: Runner, stack: str, tag: str, services: dict[str, dict[str, Any]] | None = None
) -> None:
    """Deploy (or update in place) the stack on this tag; idempotent."""
    engine.ensure_swarm(runner)
    path = write_stack_file(stack, tag, services)
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


# -- The gateway: the published service on one fixed loopback address ---------------------------

ADDRESS_ENV = "KVSTACK_LOCAL_ADDRESS"
GATEWAY_LABEL = "dev.kvstack.gateway"  # its value: the stack the gateway belongs to
ADDRESS_LABEL = "dev.kvstack.address"
FORWARDER_LABEL = "dev.kvstack.forwarder"  # a hash of kvstack/forward.py


def local_address() -> str:
    """HOST:PORT where the host reaches the published service: $KVSTACK_LOCAL_ADDRESS, else
    127.0.0.1 and the service's own port (port 0: the engine picks a free one)."""
    service = published()
    return os.environ.get(ADDRESS_ENV) or f"127.0.0.1:{service.port if service else 0}"


def published() -> catalog.Service | None:
    return next((s for s in catalog.services().values() if s.publish and s.long_running), None)


def gateway_name(stack: str, service: catalog.Service) -> str:
    return f"{stack}-{service.name}-gateway"


def gateway_network(stack: str, service: catalog.Service) -> str:
    """The network of a flow from another service to `service`: the gateway stands for a caller."""
    for flow in catalog.flows(catalog.services()):
        if flow.between_services and flow.callee == service.name and flow.caller != flow.callee:
            return network_name(stack, flow_network(flow))
    raise CommandError(f"{service.name} is published but nothing calls it: add it to a `calls`")


def ensure_gateway(runner: Runner, stack: str, image: str, address: str) -> None:
    """Run (or keep) the gateway container forwarding `address` to the published service;
    idempotent: a running gateway on the same image and address is left alone."""
    service = published()
    if service is None or service.port is None:
        return
    name = gateway_name(stack, service)
    # Keyed on what the gateway runs (kvstack.forward's code) and where it listens, not on the
    # image: a new server image must not drop every host connection during a rolling update.
    forwarder = hashlib.sha256(Path(forward.__file__).read_bytes()).hexdigest()[:16]
    labels = " ".join(
        f'{{{{index .Config.Labels "{label}"}}}}' for label in (ADDRESS_LABEL, FORWARDER_LABEL)
    )
    state = f"{{{{.State.Running}}}} {labels}"
    current = runner.query(docker("inspect", "--format", state, name)).stdout.split()
    if current == ["true", address, forwarder]:
        return
    if current:
        runner.run(docker("rm", "--force", name), capture=True)
    host, _, port = address.rpartition(":")
    publish = f"{host}:{'' if port == '0' else port}:{service.port}"
    say(f"gateway: {address} on this machine -> {service.name}:{service.port} ({name})")
    runner.run(
        docker(
            "run", "--detach", f"--name={name}", "--restart=unless-stopped",
            f"--label={GATEWAY_LABEL}={stack}", f"--label={ADDRESS_LABEL}={address}",
            f"--label={FORWARDER_LABEL}={forwarder}",
            f"--network={gateway_network(stack, service)}", f"--publish={publish}",
            "--read-only", "--cap-drop=ALL", "--security-opt=no-new-privileges",
            "--entrypoint=/opt/venv/bin/python", image,
            "-m", "kvstack.forward", str(service.port), f"{service.name}:{service.port}",
        ),
        capture=True,
    )  # fmt: skip


def gateway_address(runner: Runner, stack: str) -> str | None:
    """Where the gateway of `stack` listens on this machine (e.g. 127.0.0.1:50051), if it runs."""
    service = published()
    if service is None:
        return None
    out = runner.query(docker("port", gateway_name(stack, service), f"{service.port}/tcp"))
    ports = out.stdout.split()
    return ports[0] if out.returncode == 0 and ports else None


def published_ports(runner: Runner, stack: str) -> list[str]:
    """What the person can call from this machine, e.g. `server 127.0.0.1:50051`."""
    service, address = published(), gateway_address(runner, stack)
    return [f"{service.name} {address}"] if service and address else []


def remove(runner: Runner, stack: str, *, volumes: bool, timeout: float = 90) -> None:
    """Remove the stack and wait until its containers and network are gone."""
    label = f"label=com.docker.stack.namespace={stack}"
    gateways = runner.query(docker("ps", "-aq", "--filter", f"label={GATEWAY_LABEL}={stack}"))
    if gateways.stdout.split():
        runner.run(docker("rm", "--force", *gateways.stdout.split()), capture=True)
    if runner.query(docker("stack", "ps", "-q", stack)).returncode == 0:
        # It removes the networks right after the services, and fails (exit 1) on one that a
        # task still uses while it stops (moby/moby#31068): the loop removes those once the
        # containers are gone.
        runner.run(docker("stack", "rm", stack), check=False)
    deadline = time.monotonic() + timeout
    left: list[str] = []
    net: list[str] = []
    while not runner.dry_run and time.monotonic() < deadline:
        left = runner.query(docker("ps", "-aq", "--filter", label)).stdout.split()
        net = runner.query(docker("network", "ls", "-q", "--filter", label)).stdout.split()
        if not left and not net:
            break
        if not left:
            runner.run(docker("network", "rm", *net), capture=True, check=False)
        time.sleep(1)
    else:
        if not runner.dry_run:
            raise CommandError(
                f"stack {stack} is not gone after {timeout:.0f} s: {len(left)} containers and "
                f"{len(net)} networks left (`docker ps -a --filter {label}`, `docker network ls "
                f"--filter {label}`); run the same command again once they have stopped"
            )
    if volumes:
        vols = runner.query(docker("volume", "ls", "-q", "--filter", label)).stdout.split()
        if vols:
            runner.run(docker("volume", "rm", *vols))
    else:
        say("data volumes kept (kvstack down --volumes removes them)")


def _cmd_up(args: argparse.Namespace) -> int:
    """`kvstack deploy local` (with --tag built if missing) whose smoke test is the client run."""
    runner = Runner(dry_run=args.dry_run)
    engine.ensure(runner)
    tag = args.tag or images.version()
    images.build(runner, list(catalog.services().values()), tag, only_if_changed=True)
    request = DeployRequest(version=tag, registry=None, timeout=int(HEALTHY_TIMEOUT_S))
    Local(stack=args.stack).deploy(runner, request, smoke=not args.no_client)
    address = gateway_address(runner, args.stack)
    if address:
        say(
            f"the server answers on {address}, from this machine only; call it with "
            f"`.venv/bin/python -m kvstack client --target {address} put greeting hello`"
        )
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    runner = Runner(dry_run=args.dry_run)
    if not engine.answers(runner):
        if engine.configured_engine():
            engine.require(runner)  # says which engine did not answer, and fails
        say("no Docker engine answers on this machine: nothing to remove")
        return 0
    remove(runner, args.stack, volumes=args.volumes)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    up = sub.add_parser("up", help="build, deploy the local stack (Swarm), run the client")
    up.add_argument(
        "--stack",
        default=stack_name(),
        help="stack name (default: $KVSTACK_STACK or kvstack: %(default)s)",
    )
    up.add_argument("--tag", help="image tag to build and deploy (default: from git describe)")
    up.add_argument("--no-client", action="store_true", help="do not run the client at the end")
    up.add_argument("--dry-run", action="store_true", help="print the commands, run none")
    up.set_defaults(func=_cmd_up)
    down = sub.add_parser("down", help="remove the local stack (keeps its data volume)")
    down.add_argument(
        "--stack",
        default=stack_name(),
        help="stack name (default: $KVSTACK_STACK or kvstack: %(default)s)",
    )
    down.add_argument("--volumes", action="store_true", help="also remove its data volumes")
    down.add_argument("--dry-run", action="store_true", help="print the commands, run none")
    down.set_defaults(func=_cmd_down)


# -- the `local` target of the shared verbs (kvstack.ops.targets) -------------------------------
#
# Release history lives on the engine, in a label on each Swarm service (RELEASES_LABEL: a JSON
# list of {"version", "image", "at", "via"}, the newest last, RELEASES_KEPT of them), not in a
# file under build/: it travels with the service it describes, survives a daemon restart, a
# fresh clone and `git clean`, needs no locking between two work trees deploying the same stack,
# and `docker service inspect` shows it. Service labels are not part of the task template, so
# writing them restarts no container. Each deploy puts the label in the generated stack file (a
# stack deploy replaces service labels with the file's); rollbacks write it with
# `docker service update --label-add`. SPEC_LABEL holds a hash of the rest of the service's
# entry, so that deploying the same version twice can see that nothing would change and skip the
# stack deploy entirely (which would otherwise overwrite Swarm's PreviousSpec).

RELEASES_LABEL = "kvstack.releases"
SPEC_LABEL = "kvstack.spec"
RELEASES_KEPT = 10
POLL_S = 1.0
# Swarm's UpdateStatus.State values that mean the last update was undone by Swarm itself.
ROLLED_BACK_STATES = ("rollback_started", "rollback_paused", "rollback_completed")
BUSY_STATES = ("updating", "rollback_started")


def other_trees(live: dict[str, Live | None]) -> list[str]:
    """The work trees, other than this one, whose releases the services run now."""
    trees = {s.releases[-1].get("tree", "") for s in live.values() if s is not None and s.releases}
    return sorted(trees - {"", str(images.ROOT)})


@dataclass(frozen=True)
class Live:
    """A Swarm service as the engine runs it (from `docker service inspect`)."""

    name: str
    image: str
    replicas: int
    releases: list[dict[str, str]]
    spec_hash: str
    update_state: str
    update_started: str
    update_message: str
    previous_image: str | None
    version_index: int


def _image_of(spec: dict[str, Any]) -> str:
    image: str = spec["TaskTemplate"]["ContainerSpec"]["Image"]
    return image.split("@", 1)[0]  # a resolved digest, should one have been recorded


def inspect_service(runner: Runner, name: str) -> Live | None:
    """The live service `name`, or None when the engine has no such service."""
    result = runner.query(docker("service", "inspect", name))
    if result.returncode != 0:
        return None
    data = json.loads(result.stdout)[0]
    spec = data["Spec"]
    labels = spec.get("Labels") or {}
    try:
        releases = json.loads(labels.get(RELEASES_LABEL, "[]"))
    except ValueError:
        releases = []
    status = data.get("UpdateStatus") or {}
    previous = data.get("PreviousSpec")
    return Live(
        name=name,
        image=_image_of(spec),
        replicas=int(spec.get("Mode", {}).get("Replicated", {}).get("Replicas", 1)),
        releases=[r for r in releases if isinstance(r, dict)],
        spec_hash=labels.get(SPEC_LABEL, ""),
        update_state=status.get("State", ""),
        update_started=status.get("StartedAt", ""),
        update_message=status.get("Message", ""),
        previous_image=_image_of(previous) if previous else None,
        version_index=int(data.get("Version", {}).get("Index", 0)),
    )


# `docker stack deploy` remembers in this label the image it last deployed to a service and,
# when the stack file names that image again, keeps whatever image the service runs now. So an
# image changed outside stack deploy (rollback --to, the dev loop) must move the label too, or
# the next deploy of the label's image changes nothing (seen: a deploy after `rollback --to`
# left the service on the rolled-to image until it timed out).
STACK_IMAGE_LABEL = "com.docker.stack.image"


def set_image(name: str, image: str, labels: dict[str, str]) -> list[str]:
    """The docker command that moves service `name` to `image` (health-gated, as configured)
    and sets `labels`, keeping stack deploy's record of the image in step."""
    argv = docker("service", "update", "--detach", "--no-resolve-image", "--image", image)
    for key, value in {STACK_IMAGE_LABEL: image, **labels}.items():
        argv += ["--label-add", f"{key}={value}"]
    return [*argv, name]


def spec_hash(entry: dict[str, Any]) -> str:
    """A hash of a stack entry without its replicas and labels (what a deploy would change)."""
    deploy_section = {k: v for k, v in entry["deploy"].items() if k not in ("replicas", "labels")}
    stable = {**entry, "deploy": deploy_section}
    return hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()[:16]


def tag_of(image: str) -> str:
    return image.rsplit(":", 1)[-1] if ":" in image.rsplit("/", 1)[-1] else "latest"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def record_release(
    releases: list[dict[str, str]], version: str, image: str, via: str
) -> list[dict[str, str]]:
    """The release history with one more entry (deploy, rollback or dev), the oldest dropped
    beyond RELEASES_KEPT; kept in a label of the Swarm service (RELEASES_LABEL). `tree` is the
    work tree it came from, so a deploy from another clone can say whose release it replaces."""
    entry = {"version": version, "image": image, "at": _now(), "via": via, "tree": str(images.ROOT)}
    return [*releases, entry][-RELEASES_KEPT:]


STATE_WORDS = {"updating": "update in progress", "rollback_started": "Swarm rolling back"}


@dataclass(frozen=True)
class Progress:
    ready: int  # running, healthy tasks on the expected image
    desired: int
    starting: int = 0  # on the expected image, not healthy yet
    old_serving: int = 0  # still running another image, healthy (they answer calls)
    old_other: int = 0  # another image, not healthy (starting, failing or stopping)
    state: str = ""  # Swarm's UpdateStatus.State, if an update or rollback is under way

    @property
    def others(self) -> int:
        """Tasks that are not (yet) what the wait is for."""
        return self.starting + self.old_serving + self.old_other

    def __str__(self) -> str:
        parts = [f"{self.ready} of {self.desired} ready on the new image"]
        if self.starting:
            parts.append(f"{self.starting} new starting")
        if self.old_serving:
            parts.append(f"{self.old_serving} old still serving")
        if self.old_other:
            parts.append(f"{self.old_other} old not serving")
        if self.state:
            parts.append(STATE_WORDS.get(self.state, self.state))
        return ", ".join(parts)


@dataclass
class Local:
    """The local Docker engine in Swarm mode, one stack (default `kvstack`, as `kvstack up`)."""

    stack: str = DEFAULT_STACK
    name: str = "local"

    # -- helpers ----------------------------------------------------------------------------

    def service(self, svc: catalog.Service) -> str:
        return service_name(self.stack, svc)

    def live(self, runner: Runner, svc: catalog.Service) -> Live | None:
        return inspect_service(runner, self.service(svc))

    def require_live(self, runner: Runner, svc: catalog.Service) -> Live:
        live = self.live(runner, svc)
        if live is None:
            raise CommandError(
                f"no service {self.service(svc)} on this engine: deploy first with "
                f"`kvstack deploy local` (stack {self.stack}; `docker stack ls` lists stacks)"
            )
        return live

    def progress(self, runner: Runner, svc: catalog.Service, image: str) -> Progress:
        live = self.require_live(runner, svc)
        ps = runner.query(
            docker(
                "ps",
                "--filter",
                f"label=com.docker.swarm.service.name={self.service(svc)}",
                "--format",
                "{{.Image}}\t{{.Status}}",
            )
        )
        counts = {"ready": 0, "starting": 0, "old_serving": 0, "old_other": 0}
        for line in ps.stdout.splitlines():
            running_image, _, status = line.partition("\t")
            healthy = "(healthy)" in status
            if running_image == image:
                counts["ready" if healthy else "starting"] += 1
            else:
                counts["old_serving" if healthy else "old_other"] += 1
        return Progress(desired=live.replicas, state=live.update_state, **counts)

    def wait(
        self,
        runner: Runner,
        svc: catalog.Service,
        image: str,
        timeout: float,
        *,
        updated_after: str | None = None,
    ) -> str | None:
        """Wait until `svc` runs exactly its desired count of healthy tasks on `image` and no
        other; the failure (timed out, or rolled back by Swarm) as a sentence, or None.

        `updated_after`: the UpdateStatus.StartedAt before the change being awaited; a
        rollback state from a newer update means Swarm undid the change (failure_action)."""
        if runner.dry_run:
            return None
        deadline = time.monotonic() + timeout
        started = time.monotonic()
        shown = ""
        while True:
            live = self.require_live(runner, svc)
            if (
                updated_after is not None
                and live.update_started != updated_after
                and live.update_state in ROLLED_BACK_STATES
            ):
                why = live.update_message or "its new tasks failed"
                return (
                    f"Swarm rolled {live.name} back by itself ({why}); see "
                    f"`docker service ps --no-trunc {live.name}` and "
                    f"`docker service logs {live.name}`"
                )
            prog = self.progress(runner, svc, image)
            if (
                prog.ready == prog.desired
                and prog.others == 0
                and live.update_state not in BUSY_STATES
            ):
                took = time.monotonic() - started
                say(f"{svc.name}: all {prog.desired} replicas ready on {image} ({took:.0f} s)")
                return None
            if time.monotonic() > deadline:
                return (
                    f"{live.name} did not converge on {image} within {timeout:.0f} s ({prog}); "
                    f"see `docker service ps --no-trunc {live.name}`"
                )
            if str(prog) != shown:
                say(f"{svc.name}: {prog} ({image})")
                shown = str(prog)
            time.sleep(POLL_S)

    def smoke_test(self, runner: Runner, version: str, timeout: int) -> str | None:
        """Run every job once on the stack's network with catalog.SMOKE_ARGS (the client's
        batch, then its check that every backend holds a fresh write); the failure or None."""
        for job in (s for s in catalog.services().values() if s.kind == "job"):
            ref = images.image_ref(job, version)
            network = job_network(self.stack, job)
            say(f"smoke test: {job.name} ({ref}) on network {network}")
            container = f"{self.stack}-smoke-{job.name}-{uuid.uuid4().hex[:6]}"
            env = [f"--env={k}={v}" for k, v in callee_targets(job).items()]
            argv = docker(
                "run", "--rm", f"--name={container}", "--network", network,
                *env, ref, *catalog.SMOKE_ARGS,
            )  # fmt: skip
            try:
                code = runner.run(argv, check=False, timeout=timeout).returncode
            except CommandError:
                runner.run(docker("rm", "--force", container), check=False, capture=True)
                return f"the smoke test ({job.name}) did not finish within {timeout} s"
            if code != 0:
                return f"the smoke test ({job.name}) exited {code} (its output is above)"
        return None

    def version_to_deploy(self, runner: Runner, request: DeployRequest) -> str:
        current = images.version()
        if request.version and request.version != current:
            for svc in catalog.services().values():
                images.require_local(runner, svc, request.version)
            return request.version
        services = list(catalog.services().values())
        images.build(runner, services, current, only_if_changed=True)
        return current

    # -- verbs ------------------------------------------------------------------------------

    def deploy(self, runner: Runner, request: DeployRequest, *, smoke: bool = True) -> None:
        engine.ensure(runner)
        engine.ensure_swarm(runner)
        version = self.version_to_deploy(runner, request)
        say(f"deploying {version} to stack {self.stack} on the local engine")
        before = {svc.name: self.live(runner, svc) for svc in catalog.rollout_order()}
        for tree in other_trees(before):
            say(
                f"warning: stack {self.stack} runs a release made from another work tree "
                f"({tree}); this deploy replaces it. Use --stack NAME or KVSTACK_STACK=NAME for "
                "a stack of this tree's own"
            )
        entries: dict[str, dict[str, Any]] = {}
        images_wanted: dict[str, str] = {}
        changed: list[catalog.Service] = []  # the services whose spec this deploy changes
        for svc in catalog.rollout_order():
            live = before[svc.name]
            image = images.image_ref(svc, version)
            if (
                live is not None
                and live.image != image
                and images.inspect_image(runner, live.image) == images.inspect_image(runner, image)
            ):
                # Same content under another tag: restarting (a stateful service above all)
                # would change nothing but cost a gap; keep what runs, record the release.
                say(f"{svc.name}: {image} is the image {live.image} already runs; not restarted")
                image = live.image
            entry = service_spec(svc, version, image=image,
                                  replicas=live.replicas if live else None)  # fmt: skip
            digest = spec_hash(entry)
            releases = live.releases if live else []
            last = releases[-1] if releases else {}
            if last.get("version") != version or last.get("image") != image:
                releases = record_release(releases, version, image, "deploy")
            entry["deploy"]["labels"].update(
                {RELEASES_LABEL: json.dumps(releases, separators=(",", ":")), SPEC_LABEL: digest}
            )
            entries[svc.name] = entry
            images_wanted[svc.name] = image
            if live is None or live.spec_hash != digest or live.releases != releases:
                changed.append(svc)
        failure: str | None = None
        if not changed:
            say(f"{version} is already what stack {self.stack} runs: nothing to change")
        else:
            say("changing: " + ", ".join(s.name for s in changed))
            try:
                deploy(runner, self.stack, version, entries)
            except CommandError as err:
                failure = f"docker stack deploy failed ({err})"
        for svc in catalog.rollout_order() if failure is None else []:
            live = before[svc.name]
            failure = self.wait(
                runner, svc, images_wanted[svc.name], request.timeout,
                updated_after=live.update_started if live else "",
            )  # fmt: skip
            if failure:
                break
        gated = published()
        if failure is None and gated is not None:
            try:
                ensure_gateway(runner, self.stack, images_wanted[gated.name], local_address())
            except CommandError as err:
                # The services run; only the host's way in failed: nothing to roll back.
                raise CommandError(
                    f"{version} runs on stack {self.stack}, but its gateway on this machine "
                    f"did not start ({err}); if the address is taken (another stack, or a "
                    f"server run by hand), set {ADDRESS_ENV}=127.0.0.1:PORT and deploy again"
                ) from None
        if failure is None and smoke:
            failure = self.smoke_test(runner, version, request.timeout)
        if failure is not None:
            undone = self.undo(runner, changed, before, request.timeout)
            raise CommandError(
                f"deploy of {version} failed: {failure}; {undone}. Fix the cause and deploy "
                f"again (`kvstack status local` shows what runs now)"
            )
        if runner.dry_run:
            say(f"(dry run) nothing was changed; the commands above would deploy {version}")
        else:
            say(
                f"{version} is live on stack {self.stack}"
                + ("; smoke test passed" if smoke else "")
            )

    def undo(
        self,
        runner: Runner,
        changed: list[catalog.Service],
        before: dict[str, Live | None],
        timeout: int,
    ) -> str:
        """Return every service this deploy changed to its spec before it; say what was done."""
        undone: list[str] = []
        fresh: list[str] = []
        failed: list[str] = []
        for svc in changed:
            was = before[svc.name]
            if was is None:
                fresh.append(svc.name)
                continue
            live = self.live(runner, svc)
            rolled_by_swarm = (
                live is not None
                and live.update_started != was.update_started
                and live.update_state in ROLLED_BACK_STATES
            )
            if not rolled_by_swarm:
                ran = runner.run(docker("service", "rollback", "--detach", self.service(svc)),
                                 capture=True, check=False)  # fmt: skip
                if ran.returncode != 0:
                    why = (ran.stderr or "").strip().splitlines()[-1:] or ["no message"]
                    failed.append(f"{svc.name} to {was.image} (docker service rollback: {why[0]})")
                    continue
            problem = self.wait(runner, svc, was.image, timeout)
            (failed if problem else undone).append(f"{svc.name} to {was.image}")
        parts = []
        if undone:
            parts.append("rolled back " + ", ".join(undone))
        if failed:
            parts.append(
                "could NOT roll back " + ", ".join(failed) + " in time (see `docker service ps`)"
            )
        if fresh:
            parts.append(
                f"{', '.join(fresh)} had no earlier release to return to (remove with "
                f"`kvstack down --stack {self.stack}`)"
            )
        return "; ".join(parts) or "nothing had changed, so nothing was rolled back"

    def scale(self, runner: Runner, service: catalog.Service, replicas: int, timeout: int) -> None:
        live = self.require_live(runner, service)
        runner.run(
            docker("service", "scale", "--detach", f"{self.service(service)}={replicas}"),
            capture=True,
        )
        failure = self.wait(runner, service, live.image, timeout)
        if failure:
            raise CommandError(
                f"scaling {service.name} to {replicas}: {failure}. Swarm keeps trying; "
                f"`kvstack scale local {service.name} {live.replicas}` returns to the old count"
            )
        say(f"{service.name} runs {replicas} replicas (a later deploy keeps this count)")

    def status(self, runner: Runner) -> None:
        engine.require(runner)
        rows = [("SERVICE", "VERSION", "RELEASE", "READY", "LAST UPDATE", "IMAGE")]
        for svc in catalog.rollout_order():
            live = self.live(runner, svc)
            if live is None:
                rows.append((svc.name, "-", "-", "-", "not deployed", "-"))
                continue
            prog = self.progress(runner, svc, live.image)
            release = live.releases[-1]["version"] if live.releases else "-"
            update = live.update_state or "none"
            if live.update_message and live.update_state not in live.update_message:
                update += f" ({live.update_message})"
            rows.append(
                (svc.name, tag_of(live.image), release, f"{prog.ready}/{prog.desired}", update,
                 live.image)
            )  # fmt: skip
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        for row in rows:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1])
        for line in published_ports(runner, self.stack):
            print(f"published: {line}")

    def history(self, runner: Runner) -> None:
        engine.require(runner)
        for svc in catalog.rollout_order():
            live = self.live(runner, svc)
            print(f"{self.service(svc)}:")
            if live is None or not live.releases:
                print("  (no releases recorded)")
                continue
            current = max(
                (i for i, r in enumerate(live.releases) if r.get("image") == live.image),
                default=-1,
            )
            for i, entry in enumerate(live.releases):
                mark = "*" if i == current else " "
                print(
                    f" {mark} {entry.get('at', '?'):20}  {entry.get('version', '?'):28}  "
                    f"{entry.get('via', '?'):8}  {entry.get('image', '?')}"
                )

    def rollback(
        self, runner: Runner, service: catalog.Service | None, version: str | None, timeout: int
    ) -> None:
        targets = [service] if service else catalog.rollout_order()
        done: list[str] = []
        without_history: list[str] = []
        for svc in targets:
            live = self.require_live(runner, svc)
            if version:
                image = images.require_local(runner, svc, version)
                release = version
            else:
                earlier = [r for r in live.releases if r.get("image") != live.image]
                if not earlier:
                    message = (
                        f"{svc.name} has no earlier release than {live.image} in its history "
                        f"(`kvstack history local`); use --to VERSION"
                    )
                    if service:
                        raise CommandError(message)
                    say(message + "; left as it is")
                    without_history.append(svc.name)
                    continue
                image, release = earlier[-1]["image"], earlier[-1]["version"]
            if image == live.image:
                say(f"{svc.name} already runs {image}; nothing to do")
                continue
            name = self.service(svc)
            releases = record_release(live.releases, release, image, "rollback")
            releases_json = json.dumps(releases, separators=(",", ":"))
            label = f"{RELEASES_LABEL}={releases_json}"
            say(f"{svc.name}: {live.image} -> {image}")
            if live.previous_image == image:
                # Swarm's own rollback restores the previous spec whole (env, config...).
                runner.run(docker("service", "rollback", "--detach", name), capture=True)
                failure = self.wait(runner, svc, image, timeout)
                if not failure:  # the history records what happened, not what was tried
                    runner.run(
                        docker("service", "update", "--detach", "--label-add", label, name),
                        capture=True,
                    )
            else:
                runner.run(set_image(name, image, {RELEASES_LABEL: releases_json}), capture=True)
                failure = self.wait(runner, svc, image, timeout, updated_after=live.update_started)
            if failure:
                now = self.live(runner, svc)
                seen = (
                    f"now its spec names {now.image}, {self.progress(runner, svc, now.image)}"
                    if now is not None and not runner.dry_run
                    else "its state could not be read"
                )
                raise CommandError(
                    f"rollback of {svc.name} to {image} failed: {failure}. As seen after it: "
                    f"{seen}; see `kvstack status local` and `docker service ps --no-trunc {name}`"
                )
            done.append(f"{svc.name} to {release}")
        if done:
            say("rolled back " + ", ".join(done))
        elif without_history and len(without_history) == len(targets):
            raise CommandError(
                "nothing was rolled back: no service has an earlier release in its history "
                "(`kvstack history local`); name one with --to VERSION"
            )

    def backup(self, runner: Runner, output: Path) -> None:
        from kvstack.ops import backups

        image = self.require_live(runner, catalog.get(backups.BACKEND)).image
        backups.local_backup(runner, self.stack, image, output)

    def restore(self, runner: Runner, path: Path, force: bool) -> None:
        from kvstack.ops import backups

        image = self.require_live(runner, catalog.get(backups.BACKEND)).image
        backups.local_restore(runner, self.stack, image, path, force)


def target() -> Local:
    """The `local` target for `kvstack VERB local` (stack $KVSTACK_STACK, default kvstack)."""
    return Local(stack=stack_name())
