"""Run the tools the CLI wraps, printing each command so a person can see and repeat it.

Commands that change something are printed as `+ CMD` and skipped under --dry-run; read-only
queries (docker info, image inspect...) run even then, because the next step depends on them.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from kvstack.ops.errors import CommandError


def say(message: str) -> None:
    """A progress line for a person (stderr, so stdout carries only what a command prints)."""
    print(f"==> {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Runner:
    dry_run: bool = False

    def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        input_text: str | None = None,
        capture: bool = False,
        check: bool = True,
        timeout: float | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command that changes something; print it first; skip it under --dry-run."""
        prefix = "".join(f"{k}={shlex.quote(v)} " for k, v in (env or {}).items())
        print(f"+ {prefix}{shlex.join(argv)}", file=sys.stderr, flush=True)
        if self.dry_run:
            return subprocess.CompletedProcess(list(argv), 0, "", "")
        return self._call(argv, env, input_text, capture, check, timeout)

    def query(
        self, argv: Sequence[str], *, check: bool = False, timeout: float | None = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run a read-only command and capture its output (runs under --dry-run too)."""
        return self._call(argv, None, None, True, check, timeout)

    @staticmethod
    def _call(
        argv: Sequence[str],
        env: Mapping[str, str] | None,
        input_text: str | None,
        capture: bool,
        check: bool,
        timeout: float | None,
    ) -> subprocess.CompletedProcess[str]:
        full_env = {**os.environ, **env} if env else None
        try:
            result = subprocess.run(
                list(argv),
                env=full_env,
                input=input_text,
                capture_output=capture,
                text=True,
                check=False,
                timeout=timeout,
            )
        except FileNotFoundError as err:
            raise CommandError(f"{argv[0]} is not installed; install it and retry") from err
        except subprocess.TimeoutExpired as err:
            raise CommandError(f"`{shlex.join(argv)}` took over {timeout} s; see above") from err
        if check and result.returncode != 0:
            detail = (result.stderr or "").strip().splitlines()[-3:] if capture else []
            raise CommandError(
                f"`{shlex.join(argv)}` exited {result.returncode}"
                + (": " + " / ".join(detail) if detail else "; see its output above")
            )
        return result


def debian_like() -> bool:
    """A Debian or Ubuntu machine, with apt-get."""
    return Path("/etc/debian_version").exists() and shutil.which("apt-get") is not None


def apt_unavailable() -> str | None:
    """Why Debian's packages cannot be installed here by apt-get, or None when they can (a
    Debian or Ubuntu machine, as root): what `apt_install` needs."""
    if not debian_like():
        return "this is not a Debian or Ubuntu machine (no apt-get)"
    if os.geteuid() != 0:
        return "apt-get needs root and this runs as another user"
    return None


def apt_install(runner: Runner, package: str, what: str, took: str) -> None:
    """Install one of Debian's packages with apt-get, saying so first (`what` it is for, and
    how long it `took` here). Only where apt_unavailable() is None."""
    say(f"installing Debian's {package} for {what} (apt-get, {took})")
    apt_env = {"DEBIAN_FRONTEND": "noninteractive"}
    runner.run(["apt-get", "update", "-q"], env=apt_env)
    runner.run(["apt-get", "install", "-y", "-q", package], env=apt_env)
