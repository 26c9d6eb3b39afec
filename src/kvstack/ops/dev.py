"""`kvstack dev` (`make dev`): on every saved change, test, rebuild and roll out what it affects.

The loop polls the modification times of the files under src/kvstack and protos/ (twice a
second; a change is acted on once the tree has been quiet for DEBOUNCE_S, so an editor's
save-as-rename or a `git checkout` is one change, not ten). Polling needs no new dependency and
behaves the same on Linux, macOS and inside containers or network file systems, where inotify
events often do not arrive; for a tree of this size a poll is a few milliseconds.

Which services a change affects is the CI pipeline's rule (kvstack.ops.images.affected_by):
src/kvstack/NAME/ is service NAME's own code; the rest of src/kvstack (shared code, the
services' defaults, generated protos) is every service's; the ops CLI (src/kvstack/ops, the
service list with it), the developer tools (src/kvstack/dev), docs and tests are in no image.
A change under protos/ regenerates the Python code first (`make proto`), which then counts as
shared code.

For each affected service, in order:
1. its tests (TESTS_FOR, see tests_argv): a red test stops here, nothing is built or rolled;
2. its image, tagged dev-HASH where HASH covers exactly that service's image inputs (so the tag
   is unique to the change and an unchanged service keeps its tag);
3. on the local Swarm stack (--stack, default $KVSTACK_STACK or kvstack): `docker service
   update --image` of that service alone, which runs Swarm's health-gated update (start-first
   for stateless services, rollback on failure), and the wait until every replica is healthy on
   the new image. Jobs (the client) are rebuilt, not rolled out.

What runs is recorded on each Swarm service in the label DEV_LABEL (the HASH it runs), so
`--once` compares the working tree with what is deployed: it rolls every service whose inputs
differ and exits. A service deployed by `kvstack up`/`deploy local` has no such label; it is
taken over without a restart when its image was built from this exact tree, else rolled out.
A stack with a missing service is deployed whole first (as `kvstack up --no-client` would).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvstack.ops import catalog, engine, images, local
from kvstack.ops.engine import docker
from kvstack.ops.errors import CommandError
from kvstack.ops.shell import Runner, say

ROOT = images.ROOT
WATCHED = ("src/kvstack", "protos")
IGNORED_PARTS = frozenset({"__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache"})
IGNORED_SUFFIXES = (".pyc", ".swp", ".swx", "~", ".tmp")
POLL_S = 0.5
DEBOUNCE_S = 0.5
DEV_LABEL = "kvstack.dev.inputs"
TAG_PREFIX = "dev-"
TIMEOUT_S = 300  # a paced two-replica update takes up to ~150 s on a loaded 2-core machine
# The tests a change runs first. A service's own: every unit and integration test whose name,
# class or module file mentions the service (pytest -k NAME: tests/unit/test_NAME.py and
# tests/integration/test_NAME_service.py, as new-service makes them, and e.g.
# test_client_exits_nonzero_when_server_unreachable). A shared change: all of both levels.
# The container tests are left to `make test` (they deploy stacks of their own).
TEST_DIRS = ("tests/unit", "tests/integration")


# -- what changed, and what it affects ----------------------------------------------------------


def snapshot(root: Path = ROOT) -> dict[str, tuple[int, int]]:
    """(mtime_ns, size) of every watched file, by repository-relative path."""
    found: dict[str, tuple[int, int]] = {}
    for top in WATCHED:
        for dirpath, dirnames, filenames in os.walk(root / top):
            dirnames[:] = [d for d in dirnames if d not in IGNORED_PARTS]
            for name in filenames:
                if name.endswith(IGNORED_SUFFIXES) or name.startswith(".#"):
                    continue
                path = Path(dirpath, name)
                try:
                    st = path.stat()
                except FileNotFoundError:  # removed between the listing and the stat
                    continue
                found[path.relative_to(root).as_posix()] = (st.st_mtime_ns, st.st_size)
    return found


def changed_paths(
    before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]
) -> list[str]:
    """Paths added, removed or modified between two snapshots."""
    return sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))


def next_change(
    before: dict[str, tuple[int, int]],
    root: Path = ROOT,
    poll: float = POLL_S,
    debounce: float = DEBOUNCE_S,
) -> tuple[list[str], dict[str, tuple[int, int]]]:
    """Wait for a saved change, then until the tree has been quiet for `debounce` seconds (an
    editor's save-all, a `git checkout`: one pass, not one per file). Return the paths changed
    since `before`, and the snapshot to compare the next change with."""
    while (now := snapshot(root)) == before:
        time.sleep(poll)
    while True:
        time.sleep(debounce)
        later = snapshot(root)
        if later == now:
            return changed_paths(before, now), now
        now = later


@dataclass(frozen=True)
class Plan:
    services: list[catalog.Service]  # the service list's order
    shared: bool  # a change every service shares (its tests: all unit and integration tests)
    protos: bool  # protos/ changed: regenerate the Python code first


def plan_for(paths: list[str]) -> Plan:
    """Which services these changed paths affect (the pipeline's rule; protos/ -> all)."""
    everything = list(catalog.services().values())
    protos = any(p == "protos" or p.startswith("protos/") for p in paths)
    shared = protos or any(len(images.affected_by([p])) == len(everything) for p in paths)
    services = everything if protos else images.affected_by(paths)
    return Plan(services, shared, protos)


def tests_argv(plan: Plan) -> list[str]:
    """The pytest command for a plan's services (see TEST_DIRS); [] when nothing is affected."""
    if not plan.services:
        return []
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TEST_DIRS]
    if not plan.shared:
        argv += ["-k", " or ".join(s.name for s in plan.services)]
    return argv


# -- the loop -----------------------------------------------------------------------------------


@dataclass
class DevLoop:
    stack: str
    run_tests: bool = True
    root: Path = ROOT
    runner: Runner = field(default_factory=Runner)
    timeout: int = TIMEOUT_S

    @property
    def target(self) -> local.Local:
        return local.Local(stack=self.stack)

    def tag(self, svc: catalog.Service) -> str:
        return TAG_PREFIX + images.context_hash(self.root, svc)[:12]

    def dev_label(self, live: local.Live) -> str:
        result = self.runner.query(
            docker("service", "inspect", "--format", "{{json .Spec.Labels}}", live.name)
        )
        labels: dict[str, str] = json.loads(result.stdout or "null") or {}
        return labels.get(DEV_LABEL, "")

    def stale(self, services: list[catalog.Service]) -> list[catalog.Service]:
        """The services whose inputs differ from what the stack runs (jobs: no image yet)."""
        todo = []
        for svc in services:
            tag = self.tag(svc)
            if not svc.long_running:
                if images.inspect_image(self.runner, images.image_ref(svc, tag)) is None:
                    todo.append(svc)
                continue
            live = self.target.require_live(self.runner, svc)
            running = self.dev_label(live)
            if running == tag:
                say(f"{svc.name}: runs {tag}, its inputs as they are now; nothing to do")
            elif not running and images.built_from(self.runner, live.image, svc, self.root):
                say(f"{svc.name}: {live.image} was built from this tree; taken over, no restart")
                self.runner.run(
                    docker("service", "update", "--detach", "--label-add",
                           f"{DEV_LABEL}={tag}", live.name),
                    capture=True,
                )  # fmt: skip
            else:
                say(f"{svc.name}: runs {running or live.image}, its inputs are now {tag}")
                todo.append(svc)
        return todo

    def test(self, plan: Plan) -> bool:
        """Run the plan's tests; print where to look when one is red."""
        argv = tests_argv(plan)
        if not argv or not self.run_tests:
            if argv:
                say("tests skipped (--no-tests)")
            return True
        what = "shared code: every" if plan.shared else ", ".join(s.name for s in plan.services)
        say(f"testing ({what} unit and integration tests)")
        print(f"+ python {shlex.join(argv[1:])}", file=sys.stderr, flush=True)
        started = time.monotonic()
        result = subprocess.run(argv, cwd=self.root, capture_output=True, text=True, check=False)
        took = time.monotonic() - started
        lines = result.stdout.splitlines()
        if result.returncode == 5:  # pytest: no test selected
            say(f"no test mentions {what}; none run ({took:.0f} s)")
            return True
        if result.returncode == 0:
            say(f"tests green: {lines[-1].strip('= ') if lines else 'passed'} ({took:.0f} s)")
            return True
        print(result.stdout[-6000:], result.stderr[-2000:], sep="\n", file=sys.stderr)
        failed = [ln.split(" - ")[0].removeprefix("FAILED ").removeprefix("ERROR ")
                  for ln in lines if ln.startswith(("FAILED ", "ERROR "))]  # fmt: skip
        say(
            "RED: "
            + (", ".join(failed) or f"pytest exited {result.returncode}")
            + " failed; nothing was built or rolled out. Fix it and save again "
            + f"(re-run: python {shlex.join(argv[1:])})"
        )
        return False

    def build(self, services: list[catalog.Service]) -> None:
        for svc in services:
            ref = images.image_ref(svc, self.tag(svc))
            if images.inspect_image(self.runner, ref) is not None:
                say(f"{svc.name}: {ref} is built already (same inputs)")
            else:
                images.build(self.runner, [svc], self.tag(svc))

    def labels(self, svc: catalog.Service, live: local.Live | None) -> dict[str, Any]:
        """The stack entry of svc at its dev tag, with the labels the local target keeps."""
        tag = self.tag(svc)
        ref = images.image_ref(svc, tag)
        entry = local.service_spec(svc, tag, image=ref, replicas=live.replicas if live else None)
        releases = local.record_release(live.releases if live else [], tag, ref, "dev")
        entry["deploy"]["labels"].update(
            {
                local.RELEASES_LABEL: json.dumps(releases, separators=(",", ":")),
                local.SPEC_LABEL: local.spec_hash(entry),
                DEV_LABEL: tag,
            }
        )
        return entry

    def roll_out(self, svc: catalog.Service) -> None:
        """Update svc alone to its dev tag (Swarm's health-gated update) and wait for it."""
        live = self.target.require_live(self.runner, svc)
        labels = self.labels(svc, live)["deploy"]["labels"]
        ref = images.image_ref(svc, self.tag(svc))
        say(f"rolling out {svc.name}: {live.image} -> {ref}")
        keep = (local.RELEASES_LABEL, local.SPEC_LABEL, DEV_LABEL)
        argv = local.set_image(live.name, ref, {key: labels[key] for key in keep})
        self.runner.run(argv, capture=True)
        started = time.monotonic()
        failure = self.target.wait(
            self.runner, svc, ref, self.timeout, updated_after=live.update_started
        )
        if failure:
            raise CommandError(f"rollout of {svc.name} failed: {failure}")
        say(f"{svc.name} is live on {ref} ({time.monotonic() - started:.0f} s)")

    def bootstrap(self) -> bool:
        """Deploy the whole stack at the dev tags when a service of it is missing."""
        missing = [s.name for s in catalog.rollout_order()
                   if self.target.live(self.runner, s) is None]  # fmt: skip
        if not missing:
            return False
        say(f"stack {self.stack} lacks {', '.join(missing)}: deploying every service")
        everything = list(catalog.services().values())
        if not self.test(Plan(everything, shared=True, protos=False)):
            raise CommandError("a test is red; the stack was not deployed")
        self.build(everything)
        entries = {
            s.name: self.labels(s, self.target.live(self.runner, s))
            for s in catalog.rollout_order()
        }
        local.deploy(self.runner, self.stack, "dev", entries)
        for svc in catalog.rollout_order():
            ref = images.image_ref(svc, self.tag(svc))
            failure = self.target.wait(self.runner, svc, ref, self.timeout)
            if failure:
                raise CommandError(f"deploying {svc.name} failed: {failure}")
        say(f"stack {self.stack} is live: " + ", ".join(
            f"{s.name} {self.tag(s)}" for s in catalog.rollout_order()))  # fmt: skip
        return True

    def sync(self, plan: Plan) -> bool:
        """Test, build and roll out the plan's services that differ from the stack; False when
        a test is red (nothing changed)."""
        if plan.protos:
            say("protos/ changed: regenerating the Python code (make proto)")
            self.runner.run([sys.executable, "-m", "kvstack.dev.protogen"], capture=True)
        if self.bootstrap():
            return True
        todo = self.stale(plan.services)
        if not todo:
            say("nothing to roll out")
            return True
        every = len(todo) == len(catalog.services())
        if not self.test(Plan(todo, shared=plan.shared or every, protos=False)):
            return False
        self.build(todo)
        for svc in catalog.rollout_order():
            if svc in todo:
                self.roll_out(svc)
        say("done: " + ", ".join(f"{s.name} {self.tag(s)}" for s in todo))
        return True

    def once(self) -> bool:
        say(f"comparing the working tree with stack {self.stack}")
        return self.sync(Plan(list(catalog.services().values()), shared=False, protos=False))

    def watch(self) -> None:
        self.once()
        say(f"watching {', '.join(WATCHED)} for saved changes (Ctrl-C stops)")
        before = snapshot(self.root)
        while True:
            paths, before = next_change(before, self.root)
            plan = plan_for(paths)
            shown = ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
            say(f"changed: {shown}")
            if not plan.services:
                say("in no image (ops, dev tools, docs or tests): nothing to roll out")
                continue
            say("affects: " + ("every service (shared)" if plan.shared else
                               ", ".join(s.name for s in plan.services)))  # fmt: skip
            try:
                self.sync(plan)
            except CommandError as err:
                say(f"error: {err}")
            # Saves made during the pass are seen by the next poll (before is from its start).
            say("watching")


def _cmd_dev(args: argparse.Namespace) -> int:
    loop = DevLoop(stack=args.stack, run_tests=not args.no_tests, runner=Runner(args.dry_run))
    engine.ensure(loop.runner)
    engine.ensure_swarm(loop.runner)
    if args.once:
        return 0 if loop.once() else 1
    loop.watch()
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "dev", help="on every saved change: test, rebuild and roll out the affected services"
    )
    p.add_argument(
        "--once",
        action="store_true",
        help="one pass (working tree vs the stack), then exit; 1 when a test is red",
    )
    p.add_argument(
        "--stack",
        default=local.stack_name(),
        help="local Swarm stack (default: $KVSTACK_STACK or kvstack: %(default)s)",
    )
    p.add_argument("--no-tests", action="store_true", help="roll out without running tests")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the builds and rollouts a change would cause, run none (tests still run)",
    )
    p.set_defaults(func=_cmd_dev)
