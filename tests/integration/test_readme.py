"""The README's commands, run as a person would run them (so they cannot go stale)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from kvstack.client import Client
from kvstack.dev.processes import ServiceProcess, free_port
from tests.conftest import ROOT, Spawn

README = (ROOT / "README.md").read_text()


def by_hand_block() -> list[list[str]]:
    """The shell lines of the README's "Run the services by hand" block, split into words."""
    block = README.split("Run the services by hand", 1)[1].split("```sh", 1)[1].split("```")[0]
    return [shlex.split(line, comments=True) for line in block.strip().splitlines()]


def test_the_services_run_by_hand_with_the_readme_settings(spawn: Spawn, tmp_path: Path) -> None:
    """The backend and server lines of the README start the services with exactly the settings
    they list (ports moved to free ones, the data directory into this test's own): the
    server becomes SERVING against that backend and a put and a get go through it."""
    started: dict[str, ServiceProcess] = {}
    for words in by_hand_block():
        env = dict(w.split("=", 1) for w in words if re.fullmatch(r"[A-Z_]+=\S*", w))
        command = [w for w in words if not re.fullmatch(r"[A-Z_]+=\S*", w)]
        assert command[:3] == [".venv/bin/python", "-m", "kvstack"], command
        name = command[3]
        if name == "client":
            continue
        if "KVSTACK_DATA_DIR" in env:
            env["KVSTACK_DATA_DIR"] = str(tmp_path / "data")
        if "KVSTACK_BACKEND_TARGET" in env:
            env["KVSTACK_BACKEND_TARGET"] = started["backend"].target
        env.setdefault("KVSTACK_METRICS_PORT", str(free_port()))
        started[name] = spawn(name, env).wait_serving()
    assert set(started) == {"backend", "server"}
    client = Client(started["server"].target, verbose=False)
    try:
        client.put(b"greeting", b"hello")
        assert client.get(b"greeting") == b"hello"
    finally:
        client.close()
