"""The primary's semi-synchronous bookkeeping (kvstack.backend.replication.PrimaryState)."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import cast

import pytest
from grpc import aio

from kvstack import runtime
from kvstack.backend import Backend
from kvstack.backend.replication import UNREPLICATED, Follower, PrimaryState
from kvstack.backend.store import Store
from kvstack.directory import PRIMARY, REPLICA, Directory, Member


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


def test_every_write_acknowledged_without_a_replica_is_counted_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Writes acknowledged alone (no replica, then degraded) are counted one by one, in the
    metric too; when semi-sync returns, one log line gives how many and when the first and the
    last were. Writes a replica acknowledged are not counted."""
    before = UNREPLICATED._value.get()

    async def scenario() -> None:
        state = PrimaryState(last_seq=10, timeout=0.05)
        for seq in (11, 12):
            state.committed(seq)
            assert await state.replicated(seq) is False  # alone: no replica yet
        stream = state.connect("backend-1", 12)  # caught up: semi-sync, the run of 2 ends
        state.committed(13)
        assert await state.replicated(13) is False  # no ack in time: degraded
        state.committed(14)
        assert await state.replicated(14) is False
        state.ack(stream, 14)
        state.committed(15)
        waiting = asyncio.create_task(state.replicated(15))
        await asyncio.sleep(0)
        state.ack(stream, 15)
        assert await waiting is True
        assert state.unreplicated == 4

    with caplog.at_level(logging.INFO, logger="kvstack.backend.replication"):
        asyncio.run(scenario())
    assert UNREPLICATED._value.get() - before == 4
    runs = [r for r in caplog.records if r.getMessage() == "writes acknowledged without a replica"]
    assert [r.fields["writes"] for r in runs] == [2, 2]  # type: ignore[attr-defined]
    for run in runs:
        fields = run.fields  # type: ignore[attr-defined]
        assert fields["first_at"] <= fields["last_at"] <= time.time()


def test_the_backend_alone_keeps_its_connections() -> None:
    """KVSTACK_MAX_CONNECTION_AGE closes client connections of the server, never the backend's
    (it cut every replica's Stream every 30 s), and 0 turns it off."""
    config = runtime.RuntimeConfig(max_connection_age=30.0)
    server = dict(runtime.server_options(config))
    assert server["grpc.max_connection_age_ms"] == 30_000
    backend = dict(runtime.server_options(config, Backend.recycle_connections))
    assert "grpc.max_connection_age_ms" not in backend
    off = dict(runtime.server_options(runtime.RuntimeConfig(max_connection_age=0)))
    assert "grpc.max_connection_age_ms" not in off


class _NoPrimary:
    """A Directory stand-in: members by address, and which one is the primary (none here)."""

    def __init__(self, **errors: str) -> None:
        self.members = {address: type("M", (), {"error": e})() for address, e in errors.items()}

    def primary(self) -> None:
        return None


def follower(tmp_path: Path, directory: object) -> Follower:
    store = Store(tmp_path / "db", map_size=1 << 20)
    stand_in = cast(Directory, directory)
    return Follower(store, stand_in, "b-1", max_lag=10, on_readable=print, max_staleness=3.0)


def test_a_replica_is_readable_only_while_it_hears_from_its_primary(tmp_path: Path) -> None:
    """Following means a message from the primary within max_staleness and within max_lag of the
    position it gave; silent for longer, or too far behind, it may not answer reads, unless
    the primary it followed is down (refusing connections, or gone from DNS)."""
    silent = follower(tmp_path / "a", _NoPrimary(**{"p:1": "DEADLINE_EXCEEDED"}))
    assert not silent.following()  # never heard from a primary
    assert not silent.readable_now()
    silent.heard_at, silent.primary_seq, silent.primary_address = time.monotonic(), 5, "p:1"
    assert silent.following()
    assert silent.following(now=silent.heard_at + 3.0)
    assert not silent.following(now=silent.heard_at + 3.01)
    silent.primary_seq = 11  # 11 changes behind, over max_lag
    assert not silent.following()
    silent.primary_seq, silent.heard_at = 5, time.monotonic() - 10
    assert not silent.readable_now()  # a primary that only stopped answering may take writes
    down = follower(tmp_path / "b", _NoPrimary(**{"p:1": "UNAVAILABLE"}))
    down.heard_at, down.primary_seq, down.primary_address = time.monotonic() - 10, 0, "p:1"
    assert down.readable_now()  # a primary that is down takes no writes: this copy is current
    gone = follower(tmp_path / "c", _NoPrimary())
    gone.heard_at, gone.primary_seq, gone.primary_address = time.monotonic() - 10, 0, "p:1"
    assert gone.readable_now()


class _APrimary(_NoPrimary):
    """A Directory stand-in in which a backend said it is the primary at `answered_at`."""

    def __init__(self, answered_at: float) -> None:
        super().__init__()
        self.answered_at = answered_at

    def primary(self) -> object:  # type: ignore[override]
        return type("M", (), {"address": "p:2", "error": "", "answered_at": self.answered_at})()


def test_a_replica_whose_primary_stopped_stays_readable_until_a_primary_answers(
    tmp_path: Path,
) -> None:
    """A primary that drained says it stopped (its last position): the replica, caught up to
    within max_lag of it, answers reads past its staleness bound while no backend has said it
    is the primary since, whatever the Directory's last error for that address (a timeout too)
    and even while its view of the old primary is a refresh old; once one does, only following
    it counts."""
    stopped = follower(tmp_path / "a", _NoPrimary(**{"p:1": "DEADLINE_EXCEEDED"}))
    stopped.heard_at, stopped.primary_seq, stopped.primary_address = time.monotonic() - 10, 5, "p:1"
    assert not stopped.readable_now()  # silent past the bound, not said to have stopped
    stopped.stopped_at = time.monotonic() - 5
    assert stopped.readable_now()
    stopped.primary_seq = 11  # the stop's last position is 11 changes ahead: over max_lag
    assert not stopped.readable_now()
    stale = follower(tmp_path / "b", _APrimary(answered_at=time.monotonic() - 6))
    stale.heard_at, stale.primary_seq = time.monotonic() - 10, 0
    stale.stopped_at = time.monotonic() - 5
    assert stale.readable_now()  # the Directory's answer from the old primary, before its stop
    successor = follower(tmp_path / "c", _APrimary(answered_at=time.monotonic()))
    successor.heard_at, successor.primary_seq = time.monotonic() - 10, 0
    successor.stopped_at = time.monotonic() - 5
    assert not successor.readable_now()  # a primary answered since: it may take writes


def test_the_server_reads_from_a_replica_only_while_it_follows_a_reachable_primary() -> None:
    """With the primary reachable, a replica that says readable but not following (it lost the
    primary while the server did not) gets no reads; with no primary, it does."""

    async def scenario() -> None:
        directory = Directory("127.0.0.1:1")
        primary = Member("p", aio.insecure_channel("127.0.0.1:1"), role=PRIMARY, seq=100)
        replica = Member(
            "r", aio.insecure_channel("127.0.0.1:1"), role=REPLICA, seq=100, readable=True
        )
        directory.members = {"p": primary, "r": replica}
        assert directory.readers() == [primary]
        replica.following = True
        assert directory.readers() == [primary, replica]
        replica.following = False
        del directory.members["p"]
        assert directory.readers() == [replica]
        await directory.close()

    asyncio.run(scenario())
