"""kvstack.directory: the backend list every server and backend keeps, in this process."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import pytest

from kvstack.dev.processes import free_port
from kvstack.directory import Directory
from tests.conftest import Spawn

# Start and close a Directory 300 times, each close at a random moment of its refresh loop
# (interval 0, an address that refuses at once: refreshes complete all the time). Prints how many
# closes did not return within 2 s.
CLOSE_AT_RANDOM_MOMENTS = textwrap.dedent(
    """
    import asyncio, random
    from kvstack.directory import Directory

    async def main() -> None:
        hung = 0
        for _ in range(300):
            directory = Directory("127.0.0.1:1", interval=0, role_timeout=0.05)
            directory.start()
            await asyncio.sleep(random.uniform(0, 0.01))
            try:
                async with asyncio.timeout(2):
                    await directory.close()
            except TimeoutError:
                hung += 1
        print(hung)

    asyncio.run(main())
    """
)


def test_close_ends_the_refresh_loop_whenever_it_comes() -> None:
    """close() cancels the refresh loop whatever it is doing. With asyncio.wait_for (Python
    3.11 swallows a cancellation that lands as the awaited refresh completes) the loop went on,
    close() never returned, and a server did not exit on SIGTERM. Run in a child process, so a
    hang fails this test instead of hanging the suite."""
    try:
        result = subprocess.run(
            [sys.executable, "-c", CLOSE_AT_RANDOM_MOMENTS],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("Directory.close() hung: a refresh loop ignored its cancellation")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "0", f"closes that hung: {result.stdout}"


class ScriptedDNS(Directory):
    """A Directory whose name lookups follow a script: a DNS server that fails or forgets an
    address on cue cannot be made here, so this stands in for one (the backends are real)."""

    def __init__(self, target: str, answers: list[tuple[set[str], bool]]) -> None:
        super().__init__(target, role_timeout=2.0)
        self.answers = answers

    async def _resolve(self) -> tuple[set[str], bool]:
        return self.answers.pop(0)


def test_a_live_backend_missing_from_dns_keeps_its_channel(spawn: Spawn, tmp_path: Path) -> None:
    """A failed lookup, or an answer that leaves out a backend which still answers, closes no
    channel (closing it would cancel the calls in flight); a backend both left out and
    unreachable is let go."""
    backend = spawn("backend", {"KVSTACK_DATA_DIR": str(tmp_path / "d")}).wait_serving()
    dead = f"127.0.0.1:{free_port()}"
    live = backend.target
    answers = [({live, dead}, True), (set(), False), (set(), True), ({live}, True)]

    async def scenario() -> list[list[str]]:
        directory = ScriptedDNS(live, answers)
        seen = []
        for _ in range(4):
            await directory.refresh()
            seen.append(sorted(directory.members))
        channel = directory.members[live].channel
        await directory.close()
        assert channel.get_state() == grpc.ChannelConnectivity.SHUTDOWN
        return seen

    assert asyncio.run(scenario()) == [
        sorted([live, dead]),
        sorted([live, dead]),  # the lookup failed: nothing closed
        [live],  # answered without either: the unreachable one goes, the live one stays
        [live],
    ]
