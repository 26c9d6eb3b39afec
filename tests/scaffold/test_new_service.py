"""`kvstack new-service` in a temporary copy of the repository: a fourth service, `inventory`,
follows from the one command with no other file edited (its tests pass, every overlay renders and
validates, its image builds, it comes up SERVING on the local Swarm), refusals change nothing,
and `kvstack remove-service` leaves the copy byte for byte as it was.

The kvstack code under test is the copy's own: every command runs as a subprocess with
PYTHONPATH=<copy>/src, since the modules find the repository from their own __file__.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvstack.ops import catalog
from tests.conftest import copy_repository
from tests.manifests.render import COMBINATIONS, render_combination

ROOT = Path(__file__).resolve().parents[2]
NAME = "inventory"
PORT = 50071  # the port new-service picks after the service list's (50051, 50061)
# What running things in the copy leaves behind, which is not part of the repository.
NOT_REPOSITORY = {"__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".hypothesis"}


def snapshot(root: Path) -> dict[str, str]:
    """sha256 and mode of every file of the repository, by path (build/, caches left out)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and rel.parts[0] != "build" and not NOT_REPOSITORY & set(rel.parts):
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            out[rel.as_posix()] = f"{digest} {path.stat().st_mode & 0o777:o}"  # modes count too
    return out


def env_for(copy: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(copy / "src")}
    env.pop("KVSTACK_SERVICE", None)
    return env


def run_in(
    copy: Path, *argv: str, timeout: float = 300, check: bool = True
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, *argv],
        cwd=copy,
        env=env_for(copy),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and result.returncode != 0:
        pytest.fail(f"{argv} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def kvstack(copy: Path, *args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """`kvstack ARGS` on the copy, with the copy's own code."""
    code = "import sys; from kvstack.cli import main; sys.exit(main(sys.argv[1:]))"
    return run_in(copy, "-c", code, *args, **kwargs)  # type: ignore[arg-type]


def docker(*args: str, check: bool = True) -> str:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        pytest.fail(f"docker {' '.join(args)} exited {result.returncode}: {result.stderr}")
    return result.stdout


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A copy of the repository with `inventory` created in it, and the copy's files before."""
    copy = copy_repository(tmp_path_factory.mktemp("repo"))
    before = snapshot(copy)
    kvstack(copy, "new-service", NAME)
    return copy, before


def test_creates_the_service_and_nothing_else_is_edited(
    repo: tuple[Path, dict[str, str]],
) -> None:
    """new-service writes the service's own files, its service-list entry and the generated
    manifests; every other file of the repository is untouched."""
    copy, before = repo
    after = snapshot(copy)
    changed = {rel for rel in after if before.get(rel) != after[rel]}
    assert not set(before) - set(after), "new-service deleted files"
    own = (f"protos/kvstack/{NAME}/", f"src/kvstack/{NAME}/", f"deploy/base/{NAME}/")
    others = {
        rel
        for rel in changed
        if not rel.startswith(own)
        and rel
        not in {
            f"tests/unit/test_{NAME}.py",
            f"tests/integration/test_{NAME}_service.py",
            catalog.SERVICES_PATH,
            catalog.DEFAULTS_PATH,
            "deploy/base/kustomization.yaml",
            "deploy/components/network-policy/networkpolicy.yaml",
            "deploy/overlays/gke/images/kustomization.yaml",
            "deploy/local/stack.yaml",
        }
    }
    assert others == set(), f"new-service changed files outside its own: {sorted(others)}"
    listed = (copy / catalog.SERVICES_PATH).read_text()
    original = (ROOT / catalog.SERVICES_PATH).read_text()
    assert listed.startswith(original), "the service list's existing text (comments) changed"
    assert f"[services.{NAME}]" in listed
    # Its port is the service's own default, one line added to the others' in PORTS.
    ports_before = catalog.ports_in((ROOT / catalog.DEFAULTS_PATH).read_text())
    ports_after = catalog.ports_in((copy / catalog.DEFAULTS_PATH).read_text())
    assert ports_after == {**ports_before, NAME: PORT}
    lines_before = (ROOT / catalog.DEFAULTS_PATH).read_text().splitlines()
    lines_after = (copy / catalog.DEFAULTS_PATH).read_text().splitlines()
    assert [line for line in lines_after if line not in lines_before] == [f'    "{NAME}": {PORT},']


def test_its_own_tests_pass(repo: tuple[Path, dict[str, str]]) -> None:
    """The generated unit and integration tests pass as created (the integration test runs the
    service as a real process over loopback), and the generated code is what `make proto` gives."""
    copy, _ = repo
    result = run_in(
        copy,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        f"tests/unit/test_{NAME}.py",
        f"tests/integration/test_{NAME}_service.py",
        "tests/unit/test_proto.py",
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1].startswith("7 passed"), result.stdout  # 3+2+2


def test_every_overlay_renders_with_it(repo: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    """Every overlay, with every combination of components, renders from the copy's deploy/ with
    the new service's Deployment, Service and (where the component is on) network policy."""
    copy, _ = repo
    for overlay, components in COMBINATIONS:
        rendered = render_combination(tmp_path, overlay, components, deploy=copy / "deploy")
        names = {(d["kind"], d["metadata"]["name"]) for d in rendered.docs}
        assert {("Deployment", NAME), ("Service", NAME)} <= names, rendered.id
        if "network-policy" in components:
            assert ("NetworkPolicy", NAME) in names, rendered.id


def test_every_overlay_validates_with_it(repo: tuple[Path, dict[str, str]]) -> None:
    """The copy's own manifest tests (schema validation, policy, staleness, the network
    analysis) pass with the fourth service in the service list, without any edit to them. Left out:
    the check that docs/deploying.md shows the analyser's current table, which a new service
    changes on purpose (docs/adding-a-service.md says to paste the new one)."""
    copy, _ = repo
    docs_table = "tests/manifests/test_network_analysis.py::test_connectivity_table_in_the_docs"
    result = run_in(
        copy, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/manifests",
        "--deselect", f"{docs_table}_is_the_analysers",
    )  # fmt: skip
    assert " passed" in result.stdout, result.stdout  # run_in fails the test on a failure


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([NAME], f"a service named '{NAME}' already exists"),
        (["server"], "a service named 'server' already exists"),
        (["runtime"], "is taken"),
        (["v1"], "is taken"),
        (["Inventory"], "is not a usable service name"),
        (["in-ventory"], "is not a usable service name"),
        (["in_ventory"], "is not a usable service name"),
        (["9lives"], "is not a usable service name"),
        (["a" * 21], "is not a usable service name"),
        (["class"], "is not a usable service name"),
        (["billing", "--port", "50051"], "port 50051 is already used by service 'server'"),
        (["billing", "--port", str(PORT)], f"port {PORT} is already used by service '{NAME}'"),
        (["billing", "--port", "9464"], "port 9464 is already used by the metrics port"),
        (["billing", "--port", "80"], "out of range"),
    ],
)
def test_refusals_change_nothing(
    repo: tuple[Path, dict[str, str]], args: list[str], message: str
) -> None:
    """An existing name, a name that is not a DNS label and Python module name, or a port in
    use is refused with a message saying why (exit 1), and no file changes."""
    copy, _ = repo
    before = snapshot(copy)
    result = kvstack(copy, "new-service", *args, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert message in result.stderr
    assert snapshot(copy) == before


def test_dry_runs_list_what_they_would_change_and_change_nothing(
    repo: tuple[Path, dict[str, str]],
) -> None:
    """`new-service billing --dry-run` lists the files it would write (its proto, package, tests,
    the service list) and `remove-service inventory --dry-run` what would go; neither touches a
    file."""
    copy, _ = repo
    before = snapshot(copy)
    new = kvstack(copy, "new-service", "billing", "--dry-run")
    assert "would write protos/kvstack/billing/v1/billing.proto" in new.stdout, new.stdout
    assert f"would write {catalog.SERVICES_PATH}" in new.stdout
    assert f"would write {catalog.DEFAULTS_PATH}" in new.stdout
    gone = kvstack(copy, "remove-service", NAME, "--dry-run")
    assert f"would change src/kvstack/{NAME}/" in gone.stdout, gone.stdout
    assert "nothing was" in new.stderr
    assert "nothing was" in gone.stderr
    assert snapshot(copy) == before


def test_remove_refuses_a_hand_written_service(repo: tuple[Path, dict[str, str]]) -> None:
    """remove-service deletes only what new-service made: the original services are refused."""
    copy, _ = repo
    before = snapshot(copy)
    for name in ("client", "backend", "nosuch"):
        result = kvstack(copy, "remove-service", name, check=False)
        assert result.returncode == 1, result.stdout
    assert snapshot(copy) == before


@pytest.fixture(scope="module")
def copy_tag(repo: tuple[Path, dict[str, str]]) -> Iterator[str]:
    """The copy's image tag; afterwards its images are untagged and every kvstack-*:latest
    points where it pointed before (building in the copy moves them)."""
    copy, _ = repo
    tag = run_in(copy, "-c", "from kvstack.ops import images; print(images.version())")
    names = ("backend", "server", "client", NAME)
    latest = {
        n: docker("image", "inspect", "-f", "{{.Id}}", f"kvstack-{n}:latest", check=False)
        for n in names
    }
    yield tag.stdout.strip()
    for name in names:
        docker("image", "rm", f"kvstack-{name}:{tag.stdout.strip()}", check=False)
        if latest[name].strip():
            docker("tag", latest[name].strip(), f"kvstack-{name}:latest")
        else:
            docker("image", "rm", f"kvstack-{name}:latest", check=False)


@pytest.mark.containers
def test_its_image_builds(repo: tuple[Path, dict[str, str]], copy_tag: str) -> None:
    """`kvstack images inventory` builds its image from the one Dockerfile, for that service."""
    copy, _ = repo
    kvstack(copy, "images", NAME, timeout=600)
    label = '{{index .Config.Labels "dev.kvstack.service"}} {{.Config.User}}'
    inspected = docker("image", "inspect", "-f", label, f"kvstack-{NAME}:{copy_tag}")
    assert inspected.split() == [NAME, "65532:65532"]


@pytest.mark.containers
@pytest.mark.timeout(900)
def test_it_comes_up_serving_on_swarm(repo: tuple[Path, dict[str, str]], copy_tag: str) -> None:
    """`kvstack up` from the copy (on a stack of its own) runs it on the local Swarm with every
    replica healthy, its health SERVING and its RPC answering. Nothing calls it yet, so the flow
    graph gives it no network of the stack's (the client's network does not reach it): the
    checks run inside one of its tasks, as Swarm's own health check does."""
    copy, _ = repo
    stack = f"kvscaffold-{uuid.uuid4().hex[:6]}"
    try:
        kvstack(copy, "up", "--stack", stack, "--no-client", timeout=840)
        label = f"label=com.docker.swarm.service.name={stack}_{NAME}"
        healthy = docker("ps", "-q", "--filter", label, "--filter", "health=healthy").split()
        assert len(healthy) >= 2, docker("service", "ps", f"{stack}_{NAME}", check=False)
        run = ["exec", healthy[0], "/opt/venv/bin/python"]
        probe = docker(*run, "-m", "kvstack.probe", "--target", f"localhost:{PORT}")
        assert probe.strip() == f"localhost:{PORT}: SERVING"
        hello = (
            "import grpc; from kvstack.inventory.v1 import inventory_pb2 as p, "
            "inventory_pb2_grpc as g; "
            f"print(g.InventoryStub(grpc.insecure_channel('localhost:{PORT}'))"
            ".Hello(p.HelloRequest(name='swarm'), timeout=10).message)"
        )
        assert docker(*run, "-c", hello).strip() == "hello, swarm"
        client_net = f"{stack}_client-server"
        unreachable = docker(
            "run", "--rm", "--network", client_net, "--entrypoint", "/opt/venv/bin/python",
            f"kvstack-{NAME}:{copy_tag}", "-m", "kvstack.probe", "--target", f"{NAME}:{PORT}",
            check=False,
        )  # fmt: skip
        assert "SERVING" not in unreachable.replace("NOT_SERVING", ""), unreachable
    finally:
        kvstack(copy, "down", "--stack", stack, "--volumes", timeout=300, check=False)


def test_remove_restores_the_repository(repo: tuple[Path, dict[str, str]]) -> None:
    """remove-service, after everything above ran, leaves every file of the copy byte for byte
    as it was before new-service (build/ and caches aside)."""
    copy, before = repo
    kvstack(copy, "remove-service", NAME)
    after = snapshot(copy)
    changed = sorted(rel for rel in set(before) | set(after) if before.get(rel) != after.get(rel))
    assert changed == []


def test_rerun_completes_after_a_failure(tmp_path: Path) -> None:
    """A run cut short (some files written, the service list not yet) is completed by running the
    same command again, with the same result as one clean run."""
    clean = copy_repository(tmp_path / "clean")
    kvstack(clean, "new-service", NAME, "--stateful")
    broken = copy_repository(tmp_path / "broken")
    kvstack(broken, "new-service", NAME, "--stateful")
    # As if it had stopped before its last steps: deploy/ and the service-list entry (the port,
    # written just before the entry, is left in: the run is cut between the two).
    for rel in (
        catalog.SERVICES_PATH,
        *(p for p in snapshot(broken) if p.startswith("deploy/")),
    ):
        if (ROOT / rel).exists():
            (broken / rel).write_bytes((ROOT / rel).read_bytes())
        else:
            (broken / rel).unlink()
    (broken / f"tests/integration/test_{NAME}_service.py").unlink()
    assert snapshot(broken) != snapshot(clean)
    kvstack(broken, "new-service", NAME, "--stateful")
    assert snapshot(broken) == snapshot(clean)
