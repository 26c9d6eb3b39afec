"""The verbs every deploy target shares: deploy, scale, status, rollback, history.

`kvstack VERB TARGET ...` looks TARGET up in TARGETS and calls the matching method of the object
its factory returns; each target wraps its own tools (docker for `local`, kubectl/minikube/gcloud
for `minikube` and `gke`). To add a target, implement the Target protocol and list its factory
(a zero-argument callable, as "module:attribute") in TARGETS; its module is imported only when
the target is used.

The Kubernetes targets take --namespace NS (default kvstack): the namespace every kubectl call
names and a deploy puts every object in (kvstack.ops.kube); `local` has none and refuses it.

Every verb takes --dry-run: commands that change something are printed and not run (read-only
queries still run, since the next step depends on their answer; see kvstack.ops.shell).
"""

from __future__ import annotations

import argparse
import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from kvstack.ops import catalog
from kvstack.ops.errors import CommandError
from kvstack.ops.shell import Runner

DEFAULT_TIMEOUT_S = 300
DEFAULT_NAMESPACE = "kvstack"  # kvstack.ops.manifests.NAMESPACE, the generated manifests' own
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class DeployRequest:
    """What `kvstack deploy` was asked for; a target ignores what does not apply to it."""

    version: str | None  # None: this work tree's version (kvstack.ops.images.version())
    registry: str | None  # where to push images (gke: REGION-docker.pkg.dev/PROJECT/REPO)
    timeout: int  # seconds each rollout and the smoke test may take


class Target(Protocol):
    """A place kvstack runs: the local Docker engine (Swarm), minikube, GKE.

    Errors are raised as kvstack.ops.errors.CommandError saying what failed and what to do next.
    """

    name: str

    def deploy(self, runner: Runner, request: DeployRequest) -> None:
        """Ship the images, apply, wait for every rollout, run the smoke test; on any failure,
        roll back what this deploy changed and raise saying so. Idempotent per version."""

    def scale(self, runner: Runner, service: catalog.Service, replicas: int, timeout: int) -> None:
        """Run `replicas` copies of a long-running service (and keep any autoscaler from
        undoing it); wait until they are ready."""

    def status(self, runner: Runner) -> None:
        """Print per service the running version, ready/desired replicas and recent rollouts."""

    def rollback(
        self, runner: Runner, service: catalog.Service | None, version: str | None, timeout: int
    ) -> None:
        """Return one service (None: every long-running one) to its previous release, or to
        the release running `version`; wait until it is ready."""

    def history(self, runner: Runner) -> None:
        """Print the releases (revisions and versions) of every long-running service."""

    def backup(self, runner: Runner, output: Path) -> None:
        """Copy the primary backend's data into `output` (and its manifest beside it), online
        (kvstack.ops.backups)."""

    def restore(self, runner: Runner, path: Path, force: bool) -> None:
        """Check the backup at `path`, then restore it onto the primary; over live data only
        with `force`."""


@runtime_checkable
class Namespaced(Protocol):
    """A target in a Kubernetes namespace (minikube, kind, gke): `--namespace` sets it."""

    namespace: str


# name -> "module:factory". The local (Swarm) target lives in kvstack.ops.local.
TARGETS: dict[str, str] = {
    "local": "kvstack.ops.local:target",
    "minikube": "kvstack.ops.kube:minikube",
    "kind": "kvstack.ops.kube:kind",
    "gke": "kvstack.ops.kube:gke",
}


def get(name: str) -> Target:
    spec = TARGETS[name]
    module_name, _, attribute = spec.partition(":")
    factory: Callable[[], Target] | None = getattr(
        importlib.import_module(module_name), attribute, None
    )
    if factory is None:
        raise CommandError(
            f"the {name} target does not support this verb yet ({module_name} has no "
            f"`{attribute}`); for the local stack use `kvstack up` / `kvstack down`"
        )
    return factory()


def namespace_name(text: str) -> str:
    """A Kubernetes namespace name (an RFC 1123 DNS label), for argparse."""
    if not DNS_LABEL.match(text):
        raise argparse.ArgumentTypeError(
            "a namespace is 1-63 lowercase letters, digits and '-', starting and ending with a "
            "letter or digit"
        )
    return text


def target_for(args: argparse.Namespace) -> Target:
    """The target a verb names, in the namespace --namespace names (Kubernetes targets only)."""
    target = get(args.target)
    if args.namespace is not None:
        if not isinstance(target, Namespaced):
            raise CommandError(
                f"the {args.target} target has no namespaces; --namespace is for "
                f"{', '.join(t for t in TARGETS if t != args.target)}"
            )
        target.namespace = args.namespace
    return target


def long_running_service(name: str) -> catalog.Service:
    try:
        service = catalog.get(name)
    except KeyError as err:
        raise CommandError(str(err.args[0])) from None
    if not service.long_running:
        raise CommandError(
            f"{name} is a {service.kind}: it runs once per deploy (the smoke test) and has no "
            "replicas or releases of its own; pick a long-running service"
        )
    return service


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def _deploy(args: argparse.Namespace) -> int:
    request = DeployRequest(version=args.version, registry=args.registry, timeout=args.timeout)
    target_for(args).deploy(Runner(dry_run=args.dry_run), request)
    return 0


def check_replicas(replicas: int, force: bool) -> None:
    """Refuse a count outside the supported range unless forced, saying why."""
    low, high = catalog.MIN_REPLICAS, catalog.MAX_REPLICAS
    if force or low <= replicas <= high:
        return
    why = (
        f"fewer than {low} leaves no replica to take over when one fails or rolls"
        if replicas < low
        else f"more than {high} is beyond what kvstack is sized and tested for (each replica "
        "takes CPU and memory; on a 2-core machine it can starve the whole stack)"
    )
    raise CommandError(
        f"{replicas} replicas refused: {why}. Use {low} to {high}, or add --force if you mean it"
    )


def _scale(args: argparse.Namespace) -> int:
    check_replicas(args.replicas, args.force)
    service = long_running_service(args.service)
    target_for(args).scale(Runner(dry_run=args.dry_run), service, args.replicas, args.timeout)
    return 0


def _status(args: argparse.Namespace) -> int:
    target_for(args).status(Runner(dry_run=args.dry_run))
    return 0


def _rollback(args: argparse.Namespace) -> int:
    service = long_running_service(args.service) if args.service else None
    target_for(args).rollback(Runner(dry_run=args.dry_run), service, args.to, args.timeout)
    return 0


def _history(args: argparse.Namespace) -> int:
    target_for(args).history(Runner(dry_run=args.dry_run))
    return 0


def _backup(args: argparse.Namespace) -> int:
    from kvstack.ops import backups

    output = args.output or backups.default_output(args.target)
    target_for(args).backup(Runner(dry_run=args.dry_run), output)
    return 0


def _restore(args: argparse.Namespace) -> int:
    target_for(args).restore(Runner(dry_run=args.dry_run), args.file, args.force)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    def verb(
        name: str, help_text: str, func: Callable[[argparse.Namespace], int]
    ) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, help=help_text, description=help_text)
        parser.add_argument("target", choices=list(TARGETS), metavar="TARGET",
                            help=f"where: {', '.join(TARGETS)}")  # fmt: skip
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="print the commands that would change something; run none",
        )
        parser.add_argument("--namespace", type=namespace_name, metavar="NS",
                            help="minikube, kind, gke: the namespace to work in "
                            f"(default {DEFAULT_NAMESPACE})")  # fmt: skip
        parser.set_defaults(func=func)
        return parser

    def with_timeout(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--timeout", type=positive, default=DEFAULT_TIMEOUT_S,
                            help="seconds each rollout may take (default %(default)s)")  # fmt: skip

    p = verb("deploy", "ship, apply, wait, smoke-test; roll back by itself on failure", _deploy)
    p.add_argument("--version", help="release to deploy (default: this tree's, built if needed)")
    p.add_argument("--registry", help="gke: REGION-docker.pkg.dev/PROJECT/REPO "
                   "(default $KVSTACK_GKE_REGISTRY)")  # fmt: skip
    with_timeout(p)

    p = verb("scale", "run N replicas of a service (moves the autoscaler's bounds too)", _scale)
    p.add_argument("service", metavar="SERVICE")
    p.add_argument(
        "replicas",
        type=positive,
        metavar="N",
        help=f"{catalog.MIN_REPLICAS} to {catalog.MAX_REPLICAS} (others need --force)",
    )
    p.add_argument("--force", action="store_true", help="allow a count outside the supported range")
    with_timeout(p)

    verb("status", "per service: version, ready/desired replicas, last rollouts", _status)

    p = verb("rollback", "back to the previous release, or to --to VERSION", _rollback)
    p.add_argument("service", nargs="?", metavar="SERVICE",
                   help="default: every long-running service")  # fmt: skip
    p.add_argument("--to", metavar="VERSION", help="the release to return to")
    with_timeout(p)

    verb("history", "list the releases of every long-running service", _history)

    p = verb("backup", "copy the primary's data into one LMDB file and its manifest, online",
             _backup)  # fmt: skip
    p.add_argument("--output", type=Path, metavar="FILE",
                   help="where (default kvstack-backup-TARGET-TIME.mdb here); the manifest goes "
                   "beside it as FILE.manifest.json")  # fmt: skip

    p = verb("restore", "check a backup, then restore it onto the primary (writes stop meanwhile)",
             _restore)  # fmt: skip
    p.add_argument("file", type=Path, metavar="FILE", help="a file `kvstack backup` wrote")
    p.add_argument("--force", action="store_true",
                   help="replace the data the primary holds (refused without it)")  # fmt: skip
