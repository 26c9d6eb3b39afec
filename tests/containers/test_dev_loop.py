"""`kvstack dev`: which services a saved change affects (unit), and the loop for real on the
local Swarm target (containers).

The real runs happen in a temporary copy of the repository (the work tree is never edited), with
the copy's own code (PYTHONPATH=<copy>/src), on a stack of this module's own (kvtest-dev-XXXXXX).
Afterwards the stack and its volumes are removed, the image tags the runs made are deleted and
each kvstack-NAME:latest the builds moved is put back on the image it named before.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kvstack.ops import catalog, dev
from tests.conftest import copy_repository

SERVER_CODE = "src/kvstack/server/__init__.py"
MARK_TEST = "tests/unit/test_server_dev_mark.py"
# A test of the server, added to the copy: green while the server's DEV_MARK is "ok".
MARK_TEST_TEXT = '''"""Added by tests/containers/test_dev_loop.py in a temporary copy."""

from kvstack import server


def test_server_dev_mark() -> None:
    """Red when the server's DEV_MARK is anything but "ok"."""
    assert getattr(server, "DEV_MARK", "ok") == "ok"
'''


# -- unit: path -> services ---------------------------------------------------------------------


def names(paths: list[str]) -> tuple[list[str], bool]:
    plan = dev.plan_for(paths)
    return [s.name for s in plan.services], plan.shared


def test_a_service_package_affects_that_service_alone() -> None:
    """src/kvstack/server/... is the server's own code: the server alone, its own tests."""
    assert names(["src/kvstack/server/__init__.py"]) == (["server"], False)
    assert names(["src/kvstack/backend/store.py"]) == (["backend"], False)
    argv = dev.tests_argv(dev.plan_for(["src/kvstack/server/__init__.py"]))
    assert argv[-2:] == ["-k", "server"]


def test_shared_code_and_protos_affect_every_service() -> None:
    """Shared code (runtime.py, the services' defaults, generated v1 code) and protos/: every
    service, with every unit and integration test (no -k)."""
    every = list(catalog.services())
    for path in (
        "src/kvstack/runtime.py",
        "src/kvstack/defaults.py",
        "protos/kvstack/v1/x.proto",
    ):
        assert names([path]) == (every, True), path
    assert "-k" not in dev.tests_argv(dev.plan_for(["src/kvstack/runtime.py"]))
    assert dev.plan_for(["protos/kvstack/v1/x.proto"]).protos


def test_code_in_no_image_affects_nothing() -> None:
    """The ops CLI, the developer tools, docs and tests are in no image: no service, no tests."""
    paths = ["src/kvstack/ops/dev.py", "src/kvstack/dev/bench.py", "docs/x.md", "tests/unit/a.py"]
    # The service list too: no running service reads it, so a replica count rebuilds nothing.
    paths.append(catalog.SERVICES_PATH)
    assert names(paths) == ([], False)
    assert dev.tests_argv(dev.plan_for(paths)) == []


def test_snapshot_sees_a_save_and_ignores_caches(tmp_path: Path) -> None:
    """A saved file is a changed path; __pycache__ and editor swap files are not watched."""
    pkg = tmp_path / "src/kvstack/server"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("a\n")
    before = dev.snapshot(tmp_path)
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__/x.pyc").write_bytes(b"x")
    (pkg / ".__init__.py.swp").write_text("x")
    assert dev.changed_paths(before, dev.snapshot(tmp_path)) == []
    (pkg / "__init__.py").write_text("ab\n")
    assert dev.changed_paths(before, dev.snapshot(tmp_path)) == ["src/kvstack/server/__init__.py"]


def test_next_change_waits_for_a_quiet_tree(tmp_path: Path) -> None:
    """The watch loop's wait: nothing happens until a save; saves in quick succession (a
    save-all) come back as one change holding every path, once the tree is quiet."""
    pkg = tmp_path / "src/kvstack/server"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("a\n")
    (pkg / "other.py").write_text("a\n")
    before = dev.snapshot(tmp_path)
    result: list[tuple[list[str], dict[str, tuple[int, int]]]] = []
    waiter = threading.Thread(
        target=lambda: result.append(dev.next_change(before, tmp_path, poll=0.02, debounce=0.3))
    )
    waiter.start()
    time.sleep(0.2)
    assert not result, "returned before anything was saved"
    (pkg / "__init__.py").write_text("ab\n")
    time.sleep(0.1)  # within the debounce: the same pass
    (pkg / "other.py").write_text("ab\n")
    (tmp_path / "protos").mkdir()
    (tmp_path / "protos/new.proto").write_text("syntax = 'proto3';\n")
    waiter.join(timeout=10)
    assert result, "no change seen within 10 s"
    paths, now = result[0]
    assert paths == [
        "protos/new.proto",
        "src/kvstack/server/__init__.py",
        "src/kvstack/server/other.py",
    ]
    assert now == dev.snapshot(tmp_path)


# -- containers: the loop on the local Swarm target ---------------------------------------------


def docker(*args: str, check: bool = True) -> str:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        pytest.fail(f"docker {' '.join(args)} exited {result.returncode}: {result.stderr}")
    return result.stdout


def image_id(ref: str) -> str:
    return docker("image", "inspect", "--format", "{{.Id}}", ref, check=False).strip()


def image_tags() -> set[str]:
    out = docker(
        "images", "--format", "{{.Repository}}:{{.Tag}}", "--filter", "reference=kvstack-*"
    )
    return set(out.split())


def building(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The image refs a kvstack run built (from its "==> building REF" lines)."""
    return re.findall(r"^==> building (\S+)$", result.stderr, re.MULTILINE)


@dataclass(frozen=True)
class Service:
    image: str
    updated_at: str
    version: int
    dev_label: str


@dataclass
class DevCopy:
    root: Path
    stack: str
    built: set[str] = field(default_factory=set)  # image refs the runs built

    def kvstack(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """`kvstack ARGS` with the copy's own code, from the copy; output echoed for the log."""
        env = {**os.environ, "PYTHONPATH": str(self.root / "src")}
        env.pop("KVSTACK_SERVICE", None)
        code = "import sys; from kvstack.cli import main; sys.exit(main(sys.argv[1:]))"
        result = subprocess.run(
            [sys.executable, "-c", code, *args],
            cwd=self.root,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        print(result.stdout, result.stderr, sep="\n")
        self.built |= set(re.findall(r"^==> built (\S+) in ", result.stderr, re.MULTILINE))
        return result

    def dev_once(self, *extra: str) -> subprocess.CompletedProcess[str]:
        return self.kvstack("dev", "--once", "--stack", self.stack, *extra)

    def service(self, name: str) -> Service:
        data = json.loads(docker("service", "inspect", f"{self.stack}_{name}"))[0]
        return Service(
            image=data["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"].split("@")[0],
            updated_at=data["UpdatedAt"],
            version=data["Version"]["Index"],
            dev_label=(data["Spec"].get("Labels") or {}).get(dev.DEV_LABEL, ""),
        )

    def running_images(self, name: str) -> list[str]:
        label = f"label=com.docker.swarm.service.name={self.stack}_{name}"
        return docker("ps", "--filter", label, "--format", "{{.Image}}").split()

    def set_mark(self, value: str) -> None:
        """A one-line change to the server's code: its DEV_MARK (the last line of the file)."""
        path = self.root / SERVER_CODE
        lines = [ln for ln in path.read_text().splitlines() if not ln.startswith("DEV_MARK")]
        path.write_text("\n".join([*lines, f'DEV_MARK = "{value}"']) + "\n")


@pytest.fixture(scope="module")
def copy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevCopy]:
    """A copy of the repository with a server test of its own, deployed by `kvstack dev --once`
    on a fresh stack; what its runs made on the engine is removed afterwards.

    The engine is shared with other work: only the refs these runs report building ("built
    REF") that did not exist before are deleted, and a kvstack-NAME:latest is put back only if
    it still names an image these runs built."""
    tags_before = image_tags()
    latest_before = {s.image: image_id(f"{s.image}:latest") for s in catalog.services().values()}
    root = copy_repository(tmp_path_factory.mktemp("repo"))
    (root / MARK_TEST).write_text(MARK_TEST_TEXT)
    under_test = DevCopy(root, f"kvtest-dev-{uuid.uuid4().hex[:6]}")
    try:
        started = time.monotonic()
        result = under_test.dev_once("--no-tests")
        assert result.returncode == 0, result.stderr[-3000:]
        print(f"bootstrap deploy: {time.monotonic() - started:.0f} s")
        yield under_test
    finally:
        under_test.kvstack("down", "--stack", under_test.stack, "--volumes", timeout=180)
        ours = {ref: image_id(ref) for ref in under_test.built - tags_before}
        for repo, before in latest_before.items():
            if before and image_id(f"{repo}:latest") in ours.values():
                docker("tag", before, f"{repo}:latest", check=False)
        if ours:
            docker("rmi", *sorted(ours), check=False)


@pytest.mark.containers
@pytest.mark.timeout(1200)
def test_a_change_to_the_server_rolls_out_the_server_alone(copy: DevCopy) -> None:
    """After a one-line change to the server's code, `kvstack dev --once` runs the server's
    tests, builds the server's image alone on a new tag and rolls the server alone: every
    server task runs the new image; the backend's service is not touched (same image, same
    UpdatedAt and spec version) and no other image is built."""
    server_before, backend_before = copy.service("server"), copy.service("backend")
    assert server_before.dev_label, "the bootstrap deploy left no dev label"
    assert backend_before.dev_label, "the bootstrap deploy left no dev label"
    copy.set_mark("ok")
    started = time.monotonic()
    result = copy.dev_once()
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    print(f"server rollout by kvstack dev --once: {took:.0f} s")
    server_after, backend_after = copy.service("server"), copy.service("backend")
    assert server_after.image != server_before.image
    assert server_after.image.startswith("kvstack-server:dev-")
    assert server_after.dev_label == server_after.image.rsplit(":", 1)[1]
    assert copy.running_images("server") == [server_after.image] * 2
    assert backend_after == backend_before
    assert building(result) == [server_after.image]
    assert "testing (server unit and integration tests)" in result.stderr
    assert "tests green" in result.stderr
    assert "rolling out backend" not in result.stderr
    # Nothing changed since: a second pass does nothing.
    again = copy.dev_once("--no-tests")
    assert again.returncode == 0
    assert "nothing to roll out" in again.stderr
    assert copy.service("server") == server_after


@pytest.mark.containers
@pytest.mark.timeout(600)
def test_a_red_server_test_stops_the_rollout(copy: DevCopy) -> None:
    """A change to the server's code that breaks one of its tests: `kvstack dev --once` exits 1,
    names the failing test, builds no image and leaves every service as it was."""
    before = {name: copy.service(name) for name in ("server", "backend")}
    copy.set_mark("broken")
    try:
        result = copy.dev_once()
    finally:
        copy.set_mark("ok")
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"RED: {MARK_TEST}::test_server_dev_mark failed" in result.stderr
    assert "nothing was built or rolled out" in result.stderr
    assert {name: copy.service(name) for name in before} == before
    assert building(result) == []
