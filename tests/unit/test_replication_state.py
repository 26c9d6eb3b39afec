"""The primary's semi-synchronous bookkeeping (kvstack.backend.replication.PrimaryState)."""

from __future__ import annotations

import asyncio

from kvstack.backend.replication import PrimaryState


def mode(state: PrimaryState) -> str:
    """The current mode (a call, so the type checker does not narrow it between steps)."""
    return state.mode


def test_a_write_waits_for_a_replica_acknowledgement() -> None:
    """In semi-sync a write returns True only once a replica has acknowledged its position."""

    async def scenario() -> None:
        state = PrimaryState(last_seq=10, timeout=5)
        stream = state.connect("backend-1", 10)
        assert mode(state) == "semi-sync"
        state.committed(11)
        waiting = asyncio.create_task(state.replicated(11))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        state.ack(stream, 11)
        assert await waiting is True

    asyncio.run(scenario())


def test_no_acknowledgement_in_time_degrades_then_catching_up_restores() -> None:
    """Without an acknowledgement within the timeout the primary acknowledges alone (False)
    and says degraded; when the replica reaches the primary's position, semi-sync returns."""

    async def scenario() -> None:
        state = PrimaryState(last_seq=10, timeout=0.05)
        stream = state.connect("backend-1", 10)
        state.committed(11)
        assert await state.replicated(11) is False
        assert mode(state) == "degraded"
        state.committed(12)
        assert await state.replicated(12) is False  # degraded: no waiting at all
        state.ack(stream, 12)
        assert mode(state) == "semi-sync"

    asyncio.run(scenario())


def test_a_reconnect_is_not_undone_by_the_old_streams_disconnect() -> None:
    """A replica that reconnects before its old stream is torn down stays counted: the old
    stream's late disconnect must not switch the primary to acknowledging alone."""

    async def scenario() -> None:
        state = PrimaryState(last_seq=10, timeout=5)
        old = state.connect("backend-1", 10)
        new = state.connect("backend-1", 10)
        state.disconnect(old)
        assert mode(state) == "semi-sync"
        state.committed(11)
        waiting = asyncio.create_task(state.replicated(11))
        await asyncio.sleep(0)
        state.ack(old, 11)  # a late ack from the dead stream counts for nothing
        await asyncio.sleep(0.05)
        assert not waiting.done()
        state.ack(new, 11)
        assert await waiting is True

    asyncio.run(scenario())


def test_a_lagging_replica_joining_does_not_degrade_semi_sync() -> None:
    """With one replica caught up, a second one joining far behind leaves semi-sync on."""

    async def scenario() -> None:
        state = PrimaryState(last_seq=100, timeout=5)
        state.connect("backend-1", 100)
        state.connect("backend-2", 0)
        assert mode(state) == "semi-sync"

    asyncio.run(scenario())


def test_the_last_replica_leaving_releases_waiting_writes() -> None:
    """When the only replica goes, writes waiting for it are acknowledged alone at once."""

    async def scenario() -> None:
        state = PrimaryState(last_seq=10, timeout=5)
        stream = state.connect("backend-1", 10)
        state.committed(11)
        waiting = asyncio.create_task(state.replicated(11))
        await asyncio.sleep(0)
        state.disconnect(stream)
        async with asyncio.timeout(1):
            assert await waiting is False
        assert mode(state) == "alone"

    asyncio.run(scenario())
