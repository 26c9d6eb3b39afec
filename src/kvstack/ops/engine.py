"""The Docker engine: find the client, and make sure an engine answers (`kvstack engine`).

The engine is the one the docker client is pointed at: DOCKER_HOST or a Docker context, as for
`docker` itself. When one is configured and does not answer, kvstack says which one and stops:
starting a local daemon would not make that one answer. With none configured, on Debian/Ubuntu
as root, install Debian's docker.io and start dockerd in the background (CI machines start
fresh and have no init system running it). Anywhere else, stop with the exact instruction.
Nothing happens when an engine already answers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from kvstack.ops.errors import CommandError
from kvstack.ops.shell import Runner, apt_install, apt_unavailable, debian_like, say

# Debian's 20.10 client has BuildKit built in; a newer client without buildx (as on PATH on the
# CI machines) refuses DOCKER_BUILDKIT=1. KVSTACK_DOCKER overrides.
DEBIAN_CLIENT = "/usr/bin/docker"
DOCKERD_LOG = Path("/var/log/kvstack-dockerd.log")
START_TIMEOUT_S = 60.0


def docker_bin() -> str:
    if override := os.environ.get("KVSTACK_DOCKER"):
        return override
    if Path(DEBIAN_CLIENT).exists():
        return DEBIAN_CLIENT
    return shutil.which("docker") or "docker"


def docker(*args: str) -> list[str]:
    """A docker command line, for Runner.run/query."""
    return [docker_bin(), *args]


def answers(runner: Runner) -> bool:
    """True when `docker info` reaches an engine."""
    if not shutil.which(docker_bin()):
        return False
    result = runner.query(docker("info", "--format", "{{.ServerVersion}}"), timeout=30)
    return result.returncode == 0 and bool(result.stdout.strip())


def configured_engine() -> str | None:
    """The engine the user pointed the docker client at (DOCKER_HOST, DOCKER_CONTEXT), if any."""
    if host := os.environ.get("DOCKER_HOST"):
        return f"DOCKER_HOST={host}"
    if (context := os.environ.get("DOCKER_CONTEXT")) and context != "default":
        return f"DOCKER_CONTEXT={context}"
    config = Path(os.environ.get("DOCKER_CONFIG", Path.home() / ".docker")) / "config.json"
    try:
        current = json.loads(config.read_text()).get("currentContext")
    except (OSError, ValueError, AttributeError):
        current = None
    if current and current != "default":
        return f"the Docker context {current} (`docker context use default` to change)"
    return None


def not_answering(runner: Runner) -> str:
    """Which engine was tried and the client's own words, for an error message."""
    tried = configured_engine() or "this machine's engine (/var/run/docker.sock)"
    result = runner.query(docker("info", "--format", "{{.ServerVersion}}"), timeout=30)
    said = (result.stderr or result.stdout).strip().splitlines()
    return f"no Docker engine answers at {tried}" + (f" ({said[-1]})" if said else "")


def require(runner: Runner) -> None:
    """For verbs that only read: fail, saying which engine, when none answers (never install)."""
    if not answers(runner):
        raise CommandError(f"{not_answering(runner)}; start it (or fix DOCKER_HOST) and retry")


def _wait_for_engine(
    runner: Runner, timeout: float, daemon: subprocess.Popen[bytes] | None = None
) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if answers(runner):
            return True
        if daemon is not None and daemon.poll() is not None:
            return False  # it exited: waiting longer changes nothing
        time.sleep(1)
    return False


def ensure(runner: Runner) -> None:
    """Make sure a Docker engine answers, installing/starting Debian's where that is ours to do."""
    if answers(runner):
        return
    if configured := configured_engine():
        raise CommandError(
            f"{not_answering(runner)}. kvstack uses the engine the docker client is pointed "
            f"at and starts none of its own while {configured} is set: start that engine, or "
            "unset it to use this machine's"
        )
    if sys.platform == "darwin":
        raise CommandError(
            "no Docker engine answers; install Docker Desktop (brew install --cask docker, or "
            "https://docs.docker.com/desktop/setup/install/mac-install/), start it, then retry"
        )
    if not debian_like():
        raise CommandError(
            "no Docker engine answers; install Docker Engine "
            "(https://docs.docker.com/engine/install/), start it, then retry"
        )
    if apt_unavailable():
        raise CommandError(
            "no Docker engine answers; run: sudo apt-get install -y docker.io && "
            "sudo systemctl start docker && sudo usermod -aG docker $USER (then log in again)"
        )
    if not shutil.which("dockerd") or not Path(DEBIAN_CLIENT).exists():
        say("no Docker engine here")
        apt_install(runner, "docker.io", "the Docker engine", "about a minute")
        if runner.dry_run or _wait_for_engine(runner, 5):
            return  # an init system started it with the package
    say(f"starting dockerd in the background (log: {DOCKERD_LOG})")
    print(f"+ dockerd >{DOCKERD_LOG} 2>&1 &", file=sys.stderr, flush=True)
    if runner.dry_run:
        return
    DOCKERD_LOG.parent.mkdir(parents=True, exist_ok=True)
    with DOCKERD_LOG.open("ab") as log:
        daemon = subprocess.Popen(  # the engine outlives this command on purpose
            ["dockerd"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    say(f"waiting for the engine to answer (up to {START_TIMEOUT_S:.0f} s)")
    if not _wait_for_engine(runner, START_TIMEOUT_S, daemon):
        tail = DOCKERD_LOG.read_text(errors="replace").strip().splitlines()[-5:]
        how = (
            f"dockerd exited with code {daemon.returncode}"
            if daemon.poll() is not None
            else f"dockerd did not answer within {START_TIMEOUT_S:.0f} s"
        )
        raise CommandError(f"{how}; the end of {DOCKERD_LOG}:\n  " + "\n  ".join(tail))
    say("Docker engine is up")


def ensure_swarm(runner: Runner) -> None:
    """Make this engine a one-node swarm (stack deploy needs one); nothing if it is one."""
    state = runner.query(docker("info", "--format", "{{.Swarm.LocalNodeState}}")).stdout.strip()
    if state == "active":
        return
    say("making this engine a one-node swarm (for docker stack deploy)")
    runner.run(docker("swarm", "init", "--advertise-addr", "127.0.0.1"), capture=True)


def _cmd_engine(args: argparse.Namespace) -> int:
    ensure(Runner(dry_run=args.dry_run))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("engine", help="make sure a Docker engine answers (install/start it)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run none")
    p.set_defaults(func=_cmd_engine)
