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
import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kvstack import registry
from kvstack.cli import CommandError
from kvstack.ops import engine, images
from kvstack.ops.engine import docker
from kvstack.ops.shell import Runner, say
from kvstack.ops.targets import DeployRequest

DEFAULT_STACK = "kvstack"
BUILD_DIR = images.ROOT / "build"
NETWORK = "net"
DATA_DIR = "/data"
HEALTHY_TIMEOUT_S = 180.0
# `python -m kvstack.probe` asks the service's own gRPC health endpoint (port from the image's
# KVSTACK_SERVICE); it exits 0 only on SERVING.
PROBE = ["CMD", "/opt/venv/bin/python", "-m", "kvstack.probe"]
# Between two replicas of a rolling update or rollback of a stateless service. Callers balance
# over the tasks' addresses from DNS (dnsrr) and re-resolve at most once a second (the client's
# and the server's channel options); with gRPC's default of 30 s, replacing every replica faster
# than that left a caller with only dead addresses (measured: 8 of 340 calls failed in a 24 s
# update). A short pause lets callers learn the new task before the next old one goes.
UPDATE_DELAY = "2s"
# Swarm numbers the tasks of a service from 1 (its slot); each task of a stateful service gets
# the volume and the ordinal of its slot, and slot 1 is the primary. Swarm scales down from the
# highest slot, so the primary and its volume stay.
SLOT = "{{.Task.Slot}}"
PRIMARY_SLOT = 1


def network_name(stack: str) -> str:
    return f"{stack}_{NETWORK}"


def service_name(stack: str, service: registry.Service) -> str:
    return f"{stack}_{service.name}"


def volume_name(service: registry.Service) -> str:
    return f"{service.name}-data"


def slot_volume(stack: str, service: registry.Service) -> str:
    """The engine's name of each task's volume: one per slot, e.g. kvstack_backend-data-1."""
    return f"{stack}_{volume_name(service)}-{SLOT}"


def callee_targets(service: registry.Service) -> dict[str, str]:
    """KVSTACK_<CALLEE>_TARGET for each service it calls: the callee's name on the stack's
    network, resolved to every task's address (dnsrr) for client-side round robin."""
    return {
        f"KVSTACK_{callee.upper()}_TARGET": registry.get(callee).target for callee in service.calls
    }


def service_spec(
    service: registry.Service,
    tag: str,
    *,
    image: str | None = None,
    replicas: int | None = None,
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One service of the stack; `image`, `replicas`, `labels` override the registry's."""
    stateful = service.kind == "stateful"
    spec: dict[str, Any] = {
        "image": image or images.image_ref(service, tag),
        "environment": {
            **callee_targets(service),
            **(
                {"KVSTACK_ORDINAL": SLOT, "KVSTACK_PRIMARY_ORDINAL": str(PRIMARY_SLOT)}
                if stateful
                else {}
            ),
        },
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
            "replicas": service.replicas if replicas is None else replicas,
            "restart_policy": {"condition": "any", "delay": "1s"},
            # A stateful service has one writer per volume: stop the old task first. Others
            # start the new task, wait for it to be healthy, then stop an old one.
            # The pause between replicas outlasts gRPC's default DNS re-resolution limit (30 s):
            # a caller that resolved the name before the update learns the new tasks before
            # the last task it knew goes (see UPDATE_DELAY).
            "update_config": {
                "parallelism": 1,
                "order": "stop-first" if stateful else "start-first",
                "failure_action": "rollback",
                "monitor": "10s",
                **({} if stateful else {"delay": UPDATE_DELAY}),
            },
            "rollback_config": {
                "parallelism": 1,
                "order": "stop-first" if stateful else "start-first",
                **({} if stateful else {"delay": UPDATE_DELAY}),
            },
            "labels": {"dev.kvstack.service": service.name, **(labels or {})},
        },
    }
    if stateful:
        spec["volumes"] = [f"{volume_name(service)}:{DATA_DIR}"]
    if service.publish and service.port:
        spec["ports"] = [{"target": service.port, "protocol": "tcp", "mode": "host"}]
    return spec


def stack_spec(
    tag: str, services: dict[str, dict[str, Any]] | None = None, stack: str = DEFAULT_STACK
) -> dict[str, Any]:
    """The compose v3.8 stack of every long-running service in the registry (`services`: ready
    service entries by name, as the local target's deploy computes them)."""
    long_running = [s for s in registry.services().values() if s.long_running]
    given = services or {}
    return {
        "version": "3.8",
        "services": {s.name: given.get(s.name) or service_spec(s, tag) for s in long_running},
        "networks": {NETWORK: {"driver": "overlay", "attachable": True}},
        "volumes": {
            volume_name(s): {"name": slot_volume(stack, s)}
            for s in long_running
            if s.kind == "stateful"
        },
    }


def write_stack_file(
    stack: str, tag: str, services: dict[str, dict[str, Any]] | None = None
) -> Path:
    # JSON is YAML, and needs no YAML library in the ops CLI.
    BUILD_DIR.mkdir(exist_ok=True)
    path = BUILD_DIR / f"{stack}.stack.json"
    path.write_text(json.dumps(stack_spec(tag, services, stack), indent=2) + "\n")
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
    """`kvstack deploy local` (with --tag built if missing) whose smoke test is the client run."""
    runner = Runner(dry_run=args.dry_run)
    engine.ensure(runner)
    tag = args.tag or images.version()
    images.build(runner, list(registry.services().values()), tag, only_if_changed=True)
    request = DeployRequest(version=tag, registry=None, timeout=int(HEALTHY_TIMEOUT_S))
    Local(stack=args.stack).deploy(runner, request, smoke=not args.no_client)
    for line in published_ports(runner, args.stack):
        say(f"published: {line}")
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


image_id = images.local_id  # the local engine's ID of an image, or None

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
    beyond RELEASES_KEPT; kept in a label of the Swarm service (RELEASES_LABEL)."""
    entry = {"version": version, "image": image, "at": _now(), "via": via}
    return [*releases, entry][-RELEASES_KEPT:]


@dataclass(frozen=True)
class Progress:
    ready: int  # running, healthy containers on the expected image
    desired: int
    others: int  # containers still running on another image, or not healthy yet
    state: str

    def __str__(self) -> str:
        extra = f", {self.others} other" if self.others else ""
        state = f", {self.state}" if self.state else ""
        return f"{self.ready}/{self.desired} ready{extra}{state}"


@dataclass
class Local:
    """The local Docker engine in Swarm mode, one stack (default `kvstack`, as `kvstack up`)."""

    stack: str = DEFAULT_STACK
    name: str = "local"

    # -- helpers ----------------------------------------------------------------------------

    def long_running(self) -> list[registry.Service]:
        """Long-running services, callees first (the order they are waited for)."""
        ordered: list[registry.Service] = []

        def visit(svc: registry.Service) -> None:
            if svc in ordered:
                return
            for callee in svc.calls:
                visit(registry.get(callee))
            if svc.long_running:
                ordered.append(svc)

        for svc in registry.services().values():
            visit(svc)
        return ordered

    def service(self, svc: registry.Service) -> str:
        return service_name(self.stack, svc)

    def live(self, runner: Runner, svc: registry.Service) -> Live | None:
        return inspect_service(runner, self.service(svc))

    def require_live(self, runner: Runner, svc: registry.Service) -> Live:
        live = self.live(runner, svc)
        if live is None:
            raise CommandError(
                f"no service {self.service(svc)} on this engine: deploy first with "
                f"`kvstack deploy local` (stack {self.stack}; `docker stack ls` lists stacks)"
            )
        return live

    def progress(self, runner: Runner, svc: registry.Service, image: str) -> Progress:
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
        ready = others = 0
        for line in ps.stdout.splitlines():
            running_image, _, status = line.partition("\t")
            if running_image == image and "(healthy)" in status:
                ready += 1
            else:
                others += 1
        return Progress(ready, live.replicas, others, live.update_state)

    def wait(
        self,
        runner: Runner,
        svc: registry.Service,
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
                say(f"{svc.name}: {prog} on {image} ({time.monotonic() - started:.0f} s)")
                return None
            if time.monotonic() > deadline:
                return (
                    f"{live.name} did not converge on {image} within {timeout:.0f} s ({prog}); "
                    f"see `docker service ps --no-trunc {live.name}`"
                )
            if str(prog) != shown:
                say(f"{svc.name}: {prog} (waiting for {prog.desired} healthy on {image})")
                shown = str(prog)
            time.sleep(POLL_S)

    def smoke_test(self, runner: Runner, version: str, timeout: int) -> str | None:
        """Run every job once on the stack's network with registry.SMOKE_ARGS (the client's
        batch, then its check that every backend holds a fresh write); the failure or None."""
        for job in (s for s in registry.services().values() if s.kind == "job"):
            ref = images.image_ref(job, version)
            say(f"smoke test: {job.name} ({ref}) on network {network_name(self.stack)}")
            container = f"{self.stack}-smoke-{job.name}-{uuid.uuid4().hex[:6]}"
            env = [f"--env={k}={v}" for k, v in callee_targets(job).items()]
            argv = docker(
                "run", "--rm", f"--name={container}", "--network", network_name(self.stack),
                *env, ref, *registry.SMOKE_ARGS,
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
            for svc in registry.services().values():
                images.require_local(runner, svc, request.version)
            return request.version
        services = list(registry.services().values())
        images.build(runner, services, current, only_if_changed=True)
        return current

    # -- verbs ------------------------------------------------------------------------------

    def deploy(self, runner: Runner, request: DeployRequest, *, smoke: bool = True) -> None:
        engine.ensure(runner)
        engine.ensure_swarm(runner)
        version = self.version_to_deploy(runner, request)
        say(f"deploying {version} to stack {self.stack} on the local engine")
        before = {svc.name: self.live(runner, svc) for svc in self.long_running()}
        entries: dict[str, dict[str, Any]] = {}
        images_wanted: dict[str, str] = {}
        changed: list[registry.Service] = []  # the services whose spec this deploy changes
        for svc in self.long_running():
            live = before[svc.name]
            image = images.image_ref(svc, version)
            if (
                live is not None
                and live.image != image
                and image_id(runner, live.image) == image_id(runner, image)
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
        for svc in self.long_running() if failure is None else []:
            live = before[svc.name]
            failure = self.wait(
                runner, svc, images_wanted[svc.name], request.timeout,
                updated_after=live.update_started if live else "",
            )  # fmt: skip
            if failure:
                break
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
        changed: list[registry.Service],
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

    def scale(self, runner: Runner, service: registry.Service, replicas: int, timeout: int) -> None:
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
        rows = [("SERVICE", "VERSION", "RELEASE", "READY", "LAST UPDATE", "IMAGE")]
        for svc in self.long_running():
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
        for svc in self.long_running():
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
        self, runner: Runner, service: registry.Service | None, version: str | None, timeout: int
    ) -> None:
        targets = [service] if service else self.long_running()
        done = []
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


def target() -> Local:
    """The `local` target for `kvstack VERB local` (stack $KVSTACK_STACK, default kvstack)."""
    return Local(stack=os.environ.get("KVSTACK_STACK", DEFAULT_STACK))
