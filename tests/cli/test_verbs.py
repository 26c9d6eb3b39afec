"""The CLI as a person meets it, driven through its runner (kvstack.cli.main) and as a process."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvstack import cli
from kvstack.ops import catalog


@pytest.mark.parametrize("replicas", ["1", "6", "50"])
def test_scale_refuses_counts_outside_two_to_five(
    replicas: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`kvstack scale local server N` outside 2..5 exits 1 with the reason and the way out,
    before it touches any engine (no Docker is asked: the refusal comes first)."""
    assert cli.main(["scale", "local", "server", replicas]) == 1
    err = capsys.readouterr().err
    assert f"{replicas} replicas refused" in err
    assert "--force" in err


# A verb with a long listing (as `kvstack history` has on a long-lived stack), run in a process
# of its own so that its stdout is a real pipe; the verb is replaced so no engine is needed.
LONG_LISTING = """
import sys
from kvstack import cli
from kvstack.ops import targets
def listing(args):
    for i in range(100_000):
        print(f"release {i}")
    return 0
targets._history = listing
sys.exit(cli.main(["history", "local"]))
"""


def test_a_closed_pipe_ends_quietly() -> None:
    """`kvstack history local | head -1`: the reader closes the pipe early, and kvstack ends
    without a BrokenPipeError traceback."""
    proc = subprocess.Popen(
        [sys.executable, "-c", LONG_LISTING], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None
    proc.stdout.read(10)
    proc.stdout.close()
    _, err = proc.communicate(timeout=60)
    assert b"Traceback" not in err, err.decode()
    assert b"BrokenPipe" not in err, err.decode()  # nor Python's "Exception ignored" at exit
    assert proc.returncode == 141  # 128 + SIGPIPE: the listing did not finish


@pytest.mark.parametrize("argv", [["engine"], ["status", "local"], ["history", "local"]])
def test_a_configured_engine_that_does_not_answer_is_named(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With DOCKER_HOST pointing at an engine that is not there, kvstack names it, starts and
    installs nothing, and exits 1 (a read-only verb too, rather than report "not deployed")."""
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/kvstack-test.sock")
    started = time.monotonic()
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "DOCKER_HOST=unix:///nonexistent/kvstack-test.sock" in err, err
    assert "dockerd" not in err
    assert time.monotonic() - started < 30


def test_a_wrong_service_list_is_an_error_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A services.toml edited wrong (a port set there, where kvstack.defaults holds it) makes
    every verb exit 1 with the catalog's message, which names the file to fix."""
    wrong = tmp_path / "services.toml"
    wrong.write_text(
        catalog.SERVICES_FILE.read_text().replace(
            'kind = "stateless"\n', 'kind = "stateless"\nport = 1\n'
        )
    )
    monkeypatch.setattr(catalog, "SERVICES_FILE", wrong)
    catalog.services.cache_clear()
    try:
        assert cli.main(["pipeline", "changed", "--all"]) == 1
    finally:
        catalog.services.cache_clear()
    err = capsys.readouterr().err
    assert err.startswith("kvstack: error: ")
    assert "set it in kvstack.defaults.PORTS (src/kvstack/defaults.py)" in err
    assert "Traceback" not in err
