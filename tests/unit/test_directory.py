"""kvstack.directory: the backend list every server and backend keeps, in this process."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

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
