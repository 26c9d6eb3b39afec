"""etcd, the benchmark's peer: Debian's etcd-server, installed as `make up` installs Docker
(kvstack.ops.shell.apt_install), run as one node or a three-node cluster on 127.0.0.1 only, with
its data in a directory the caller gives (a temporary one) and stopped afterwards."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from kvstack.dev.processes import free_port
from kvstack.ops.errors import CommandError
from kvstack.ops.shell import Runner, apt_install, apt_unavailable

PACKAGE = "etcd-server"  # Debian's package of the etcd daemon (etcd-client holds etcdctl)
READY_TIMEOUT_S = 30.0


def ensure() -> tuple[str | None, str]:
    """(the etcd binary, "") when etcd can run here, installing Debian's package where that is
    ours to do; (None, why not) otherwise."""
    if found := shutil.which("etcd"):
        return found, ""
    if why := apt_unavailable():
        return None, f"etcd is not installed and {why}: install etcd (Debian: {PACKAGE})"
    try:
        apt_install(Runner(), PACKAGE, "the benchmark's peer, etcd", "about 30 s")
    except CommandError as err:
        return None, f"installing Debian's {PACKAGE} failed ({err}); install it by hand"
    if found := shutil.which("etcd"):
        return found, ""
    return None, f"Debian's {PACKAGE} installed no `etcd` on PATH"


def version(binary: str) -> str:
    """etcd's version, e.g. 3.4.23 (from the first line of `etcd --version`)."""
    done = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    first = (done.stdout.strip().splitlines() or ["unknown"])[0]
    return first.rpartition(":")[2].strip()


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def client(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"


def _ready(target: str, put: bytes, method: str) -> bool:
    """Whether the member at target commits a put (it has a leader, a quorum is up)."""
    with grpc.insecure_channel(target) as channel:
        call: Any = channel.unary_unary(method)  # bytes in, bytes out
        try:
            call(put, timeout=2)
        except grpc.RpcError:
            return False
    return True


@contextlib.contextmanager
def cluster(
    binary: str, nodes: int, data_dir: Path, log_dir: Path, probe: bytes, method: str
) -> Iterator[list[Member]]:
    """`nodes` etcd members on loopback, each with its data under data_dir; yields them once
    each of them commits `probe` (a serialised put to `method`: a leader is elected and every
    member reaches it), and stops them on the way out."""
    members = [Member(f"n{i}", free_port(), free_port()) for i in range(nodes)]
    initial = ",".join(f"{m.name}={m.peer_url}" for m in members)
    try:
        for m in members:
            client_url = f"http://{m.client}"
            argv = [
                binary,
                f"--name={m.name}",
                f"--data-dir={data_dir / m.name}",
                f"--listen-client-urls={client_url}",
                f"--advertise-client-urls={client_url}",
                f"--listen-peer-urls={m.peer_url}",
                f"--initial-advertise-peer-urls={m.peer_url}",
                f"--initial-cluster={initial}",
                "--initial-cluster-state=new",
                "--initial-cluster-token=kvstack-bench",
            ]
            with (log_dir / f"etcd-{nodes}-{m.name}.log").open("ab") as log:
                m.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not all(_ready(m.client, probe, method) for m in members):
            exited = [m.name for m in members if m.proc and m.proc.poll() is not None]
            if exited or time.monotonic() > deadline:
                raise RuntimeError(
                    f"etcd ({nodes} node(s)) did not commit a put within {READY_TIMEOUT_S:.0f} s"
                    + (f"; {', '.join(exited)} exited" if exited else "")
                    + f": see {log_dir}/etcd-{nodes}-*.log"
                )
            time.sleep(0.2)
        yield members
    finally:
        for m in members:
            if m.proc and m.proc.poll() is None:
                m.proc.send_signal(signal.SIGTERM)
        for m in members:
            if m.proc:
                try:
                    m.proc.wait(15)
                except subprocess.TimeoutExpired:
                    m.proc.kill()
                    m.proc.wait()
