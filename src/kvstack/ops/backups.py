"""`kvstack backup TARGET [--output FILE]` and `kvstack restore TARGET FILE [--force]`.

Both reach the primary backend's Backup RPC (kvstack.v1.Backup) only where its port is already
reachable, and open no new network path to it:

- local: a one-shot `docker run` of the image the backend runs, on the network of the server's
  flow to the backend (standing where the server stands, as the tests' own listings do), with
  the backup's directory bind-mounted. It runs `python -m kvstack.backup` (no shell: the image
  has none). No port is published, not even on loopback.
- minikube, gke: `kubectl port-forward pod/backend-0 :50061` on this machine's loopback, then
  the same client in this process. A port-forward goes through the API server and the kubelet
  into the pod's own network namespace, so the NetworkPolicies (which govern traffic between
  pods) need no new rule, and nothing else can use it.

The file is checked here first (kvstack.backup.check_file) and again by the primary, so a bad
file changes nothing anywhere.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from kvstack import backup
from kvstack.ops import catalog
from kvstack.ops.errors import CommandError
from kvstack.ops.shell import Runner, say

BACKEND = "backend"
MOUNT = "/backup"
FORWARD_WAIT_S = 30.0
FORWARDING = re.compile(r"Forwarding from 127\.0\.0\.1:(\d+) ->")


def default_output(target: str) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return Path(f"kvstack-backup-{target}-{stamp}.mdb")


def check_output(output: Path) -> Path:
    """Where a new backup may go: never over an existing file."""
    output = output.resolve()
    for path in (output, backup.manifest_path(output)):
        if path.exists():
            raise CommandError(
                f"{path} exists: a backup never overwrites one; give another --output"
            )
    if not output.parent.is_dir():
        raise CommandError(
            f"{output.parent} is not a directory: create it or give another --output"
        )
    return output


def check_backup(path: Path) -> Path:
    """The backup at `path`, checked before anything else happens (CommandError if bad)."""
    try:
        manifest = backup.check_file(path)
    except backup.BadBackup as err:
        raise CommandError(f"{err}. Nothing was sent to the target") from None
    say(f"{path}: a kvstack backup of {manifest.keys} keys at change-log position "
        f"{manifest.seq}, taken {manifest.created_at}; size and SHA-256 check out")  # fmt: skip
    return path.resolve()


# -- local --------------------------------------------------------------------------------------


def local_run(runner: Runner, stack: str, image: str, mount: str, args: list[str]) -> int:
    """Run `python -m kvstack.backup ARGS` once in `image` on the stack's backend network."""
    from kvstack.ops import local
    from kvstack.ops.engine import docker

    backend = catalog.get(BACKEND)
    argv = docker(
        "run", "--rm", f"--name={stack}-backup-{uuid.uuid4().hex[:6]}",
        "--network", local.gateway_network(stack, backend),
        f"--user={os.getuid()}:{os.getgid()}", "--volume", mount,
        "--entrypoint", "/opt/venv/bin/python", image,
        "-m", "kvstack.backup", *args, "--backend", backend.target.removeprefix("dns:///"),
    )  # fmt: skip
    return runner.run(argv, check=False).returncode


def local_backup(runner: Runner, stack: str, image: str, output: Path) -> None:
    output = check_output(output)
    mount = f"{output.parent}:{MOUNT}"
    args = ["take", "--output", f"{MOUNT}/{output.name}", "--shown-as", str(output)]
    code = local_run(runner, stack, image, mount, args)
    if code != 0:
        raise CommandError(f"the backup failed (its reason is above); {output} was not written")


def local_restore(runner: Runner, stack: str, image: str, path: Path, force: bool) -> None:
    path = check_backup(path)
    mount = f"{path.parent}:{MOUNT}:ro"
    args = ["restore", f"{MOUNT}/{path.name}", "--shown-as", str(path)]
    args += ["--force"] if force else []
    if local_run(runner, stack, image, mount, args) != 0:
        raise CommandError("the restore did not happen (its reason is above)")


# -- Kubernetes ---------------------------------------------------------------------------------


@contextlib.contextmanager
def port_forward(runner: Runner, kubectl: list[str], where: str) -> Iterator[str | None]:
    """`kubectl port-forward` to the primary's backend port on 127.0.0.1 (a port kubectl
    picks), for as long as the block runs; yields 127.0.0.1:PORT (None under --dry-run)."""
    backend = catalog.get(BACKEND)
    pod = f"pod/{backend.name}-0"
    argv = [*kubectl, "port-forward", "--address=127.0.0.1", pod, f":{backend.port}"]
    print(f"+ {shlex.join(argv)} &", file=sys.stderr, flush=True)
    if runner.dry_run:
        yield None
        return
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except FileNotFoundError as err:
        raise CommandError("kubectl is not installed; install it and retry") from err
    try:
        port = _forwarded_port(proc)
        if port is None:
            ended = proc.poll()
            proc.kill()
            said = _finish(proc).strip().splitlines()[-2:]
            how = (
                f"exited {ended}"
                if ended is not None
                else f"did not say it was forwarding within {FORWARD_WAIT_S:g} s"
            )
            raise CommandError(
                f"`kubectl port-forward` to {pod} on {where} {how}: "
                f"{' / '.join(said) or 'no output'}. Is {pod} Running "
                f"(`{shlex.join([*kubectl, 'get', pod])}`)? Retry once it is"
            )
        say(f"port-forward to {pod} on 127.0.0.1:{port} (this machine only, for this command)")
        yield f"127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.terminate()
        _finish(proc)


def _finish(proc: subprocess.Popen[str]) -> str:
    """Wait for kubectl to end (killed after 10 s), close its pipes; return its stderr."""
    try:
        return proc.communicate(timeout=10)[1] or ""
    except (subprocess.TimeoutExpired, ValueError):
        proc.kill()
        proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        return ""


def _forwarded_port(proc: subprocess.Popen[str]) -> int | None:
    """The local port from kubectl's `Forwarding from 127.0.0.1:PORT -> ...` line."""
    found: list[int] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if match := FORWARDING.search(line):
                found.append(int(match[1]))
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + FORWARD_WAIT_S
    while not found and reader.is_alive() and time.monotonic() < deadline:
        reader.join(0.05)
    return found[0] if found else None


def _client(action: str, call: Callable[[], object]) -> None:
    """Run the backup client's step, turning its failures into CommandError."""
    import grpc

    try:
        call()
    except (backup.BadBackup, backup.BadTarget) as err:
        raise CommandError(str(err)) from None
    except grpc.RpcError as err:
        raise CommandError(f"the {action} failed: {backup.describe(err)}") from None


def kube_backup(runner: Runner, kubectl: list[str], where: str, output: Path) -> None:
    output = check_output(output)
    with port_forward(runner, kubectl, where) as address:
        if address is None:
            say(f"(dry run) would copy the primary's data into {output}")
            return
        _client("backup", lambda: backup.take(address, output))


def kube_restore(runner: Runner, kubectl: list[str], where: str, path: Path, force: bool) -> None:
    path = check_backup(path)
    with port_forward(runner, kubectl, where) as address:
        if address is None:
            say(f"(dry run) would restore {path} onto the primary" + (" (forced)" if force else ""))
            return
        _client("restore", lambda: backup.restore(address, path, force))
