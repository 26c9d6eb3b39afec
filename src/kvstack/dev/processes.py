"""kvstack services run as real processes (`python -m kvstack NAME`) on loopback: what the
integration tests and the benchmark (kvstack.dev.bench) both start. Needs no pytest, so the
benchmark runs from an installed package; under pytest a failure fails the test with the
service's log."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from kvstack.probe import check


class ServiceFailed(AssertionError):
    """A service process exited, did not become SERVING, or did not stop in time; the message
    holds its log. An AssertionError, so pytest reports it as the test's failure."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class ServiceProcess:
    """A kvstack service run as a real process (`python -m kvstack NAME`) on loopback."""

    name: str
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    unset: tuple[str, ...] = ()  # variables the process must not see (to test a default)
    proc: subprocess.Popen[bytes] | None = None
    _terminated: bool = field(default=False, init=False, repr=False)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ServiceProcess:
        env = {
            **os.environ,
            "KVSTACK_PORT": str(self.port),
            "KVSTACK_METRICS_PORT": "0",
            "KVSTACK_HOST": "127.0.0.1",
            "PYTHONFAULTHANDLER": "1",  # SIGABRT (see wait) prints every thread's stack
            **self.env,
        }
        for name in ("KVSTACK_SERVICE", *self.unset):
            env.pop(name, None)
        self._log = self.log_path.open("ab")
        self._terminated = False
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvstack", self.name],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        return self

    def health(self) -> str:
        return check(self.target, timeout=1.0)

    def wait_serving(self, timeout: float = 20.0) -> ServiceProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                code = self.proc.returncode
                raise ServiceFailed(f"{self.name} exited with {code}:\n{self.logs()}")
            if self.health() == "SERVING":
                return self
            time.sleep(0.1)
        raise ServiceFailed(f"{self.name} not SERVING after {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        """The exit code; a process still running after `timeout` is aborted and the test fails
        with its log, which ends with where each of its threads was waiting."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGABRT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
            raise ServiceFailed(
                f"{self.name} still running after {timeout} s:\n{self.logs()[-6000:]}"
            ) from None

    def terminate(self) -> None:
        """SIGTERM, once, if it still runs (stop() then waits for it): several processes
        told at once drain at the same time instead of one after another."""
        if self.proc is not None and self.proc.poll() is None and not self._terminated:
            self.proc.send_signal(signal.SIGTERM)
            self._terminated = True

    def stop(self) -> None:
        self.terminate()
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if hasattr(self, "_log"):
            self._log.close()
