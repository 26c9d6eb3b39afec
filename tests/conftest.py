"""Fixtures shared by every test level: free loopback ports and real service processes."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvstack.dev.processes import ServiceProcess, free_port

ROOT = Path(__file__).resolve().parents[1]

# Test stacks never take the fixed address a developer's `make up` stack uses (127.0.0.1:50051):
# each test stack's gateway gets a loopback port the engine picks (kvstack.ops.local). Set here,
# at collection, so the CLI processes the tests start inherit it too.
os.environ["KVSTACK_LOCAL_ADDRESS"] = "127.0.0.1:0"


def copy_repository(dest: Path) -> Path:
    """The working tree's files git knows of (tracked, or new and not ignored), as they are now."""
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout.decode()
    for rel in filter(None, listed.split("\0")):
        src = ROOT / rel
        if src.is_file():  # a tracked file deleted in the working tree is skipped
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).write_bytes(src.read_bytes())
            (dest / rel).chmod(src.stat().st_mode)
    return dest


def listeners(port: int) -> set[str]:
    """The local addresses (as /proc/net/tcp writes them: 0100007F is 127.0.0.1) of every
    listening TCP socket on `port` on this machine; read from the kernel, no traffic sent."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, _, hex_port = fields[1].partition(":")
            if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


# 127.0.0.1, ::1 and ::ffff:127.0.0.1 (an IPv6 socket bound to the IPv4 loopback)
LOOPBACK = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}


Spawn = Callable[..., ServiceProcess]


@dataclass
class Stack:
    backend: ServiceProcess
    server: ServiceProcess
    data_dir: Path


class Spawner:
    """Starts service processes, each logging to a file in `log_dir`, and stops every one."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[ServiceProcess] = []

    def __call__(
        self,
        name: str,
        env: dict[str, str] | None = None,
        port: int | None = None,
        unset: tuple[str, ...] = (),
    ) -> ServiceProcess:
        log = self.log_dir / f"{name}-{len(self.started)}.log"
        svc = ServiceProcess(name, port or free_port(), log, env or {}, unset=unset)
        self.started.append(svc)
        return svc.start()

    def stop_all(self) -> None:
        for svc in self.started:
            svc.terminate()
        for svc in self.started:
            svc.stop()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """Start service processes; every one still running is stopped after the test."""
    spawner = Spawner(tmp_path)
    yield spawner
    spawner.stop_all()


@pytest.fixture(scope="module")
def module_spawn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Spawn]:
    """As `spawn`, for processes every test of one module shares (starting them is most of an
    integration test's time). Only for tests that write keys of their own, or only read, and
    never signal, stop or reconfigure a process, nor count what the whole process logged."""
    spawner = Spawner(tmp_path_factory.mktemp("shared"))
    yield spawner
    spawner.stop_all()


def start_stack(spawn: Spawn, data_dir: Path, **backend_env: str) -> Stack:
    backend = spawn("backend", {"KVSTACK_DATA_DIR": str(data_dir), **backend_env})
    backend.wait_serving()
    server = spawn("server", {"KVSTACK_BACKEND_TARGET": f"dns:///{backend.target}"})
    server.wait_serving()
    return Stack(backend, server, data_dir)


@pytest.fixture
def stack(spawn: Spawn, tmp_path: Path) -> Stack:
    """A backend (LMDB in a temporary directory) and a server in front of it, both SERVING."""
    return start_stack(spawn, tmp_path / "data")


@pytest.fixture(scope="module")
def shared_stack(module_spawn: Spawn, tmp_path_factory: pytest.TempPathFactory) -> Stack:
    """A `stack` that every test of one module shares (see module_spawn for which may)."""
    return start_stack(module_spawn, tmp_path_factory.mktemp("data"))
