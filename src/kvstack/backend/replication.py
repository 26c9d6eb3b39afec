"""Replication: the primary streams its change log to read replicas (see docs/architecture.md).

- The primary records every change in its LMDB log in the same transaction as the change.
- A replica opens Replication.Stream with its position; the primary sends every logged change
  after it, then new ones as they commit (and a heartbeat each second when idle). The replica
  applies each batch and its new position in one transaction, then acknowledges.
- A replica whose position is no longer in the primary's log (new, trimmed, or ahead of a primary
  that lost its data) first copies a consistent snapshot.
- Semi-synchronous acknowledgement: with a replica connected and caught up, the primary
  acknowledges a write only once a replica has acknowledged it. When none does within
  KVSTACK_SEMISYNC_TIMEOUT, the primary acknowledges alone ("degraded"), says so in its logs and
  metrics, and returns to semi-sync as soon as a replica has caught up again. Every write
  acknowledged without a replica's copy is counted (kvstack_replication_unreplicated_writes_total)
  and each run of them is logged with its first and last time and its count.
- The backend's server never recycles connections (Backend.recycle_connections), so nothing but
  a failure cuts a replica's stream, and a replica whose stream was cut streams again at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import queue
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Literal, cast

from grpc import aio
from prometheus_client import Counter, Gauge, Histogram

from kvstack.backend.store import LogGap, Store
from kvstack.directory import Directory, Member
from kvstack.runtime import fields
from kvstack.v1 import kv_pb2, replication_pb2, replication_pb2_grpc

log = logging.getLogger("kvstack.backend.replication")
Context = aio.ServicerContext[Any, Any]
Mode = Literal["alone", "semi-sync", "degraded"]

SEMISYNC = Gauge(
    "kvstack_replication_semisync", "1 while the primary waits for a replica before acknowledging"
)
REPLICAS = Gauge("kvstack_replication_replicas", "replicas streaming from this primary")
DEGRADED = Counter(
    "kvstack_replication_degraded_total", "times the primary fell back to acknowledging alone"
)
UNREPLICATED = Counter(
    "kvstack_replication_unreplicated_writes_total",
    "writes the primary acknowledged with no replica holding them (modes alone and degraded)",
)
LAG = Gauge("kvstack_replication_lag_changes", "changes this replica is behind its primary")
LAG_SECONDS = Histogram(
    "kvstack_replication_lag_seconds",
    "from the primary's commit to this replica's commit of the same change",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)

BATCH_CHANGES = 500
HEARTBEAT_S = 1.0
SNAPSHOT_CHUNK_S = 30.0
SNAPSHOT_QUEUED = 8  # snapshot chunks received but not yet written, at most
# A replica answers reads only while it heard from its primary this recently (KVSTACK_MAX_STALENESS)
DEFAULT_MAX_STALENESS_S = 3.0
WATCH_S = 0.25  # how often a replica checks that bound
FLUSH_CHANGES = 2 * BATCH_CHANGES  # a draining primary sends a replica at most this much more
CUT_RETRY_S = 2.0  # after a working stream is cut, retry every 0.05 s (else 0.5 s) this long
Chunk = tuple[int, list[tuple[bytes, bytes]]]  # a snapshot's position, and entries


class PrimaryState:
    """The primary's view of its replicas: who is connected, what each has acknowledged, and
    whether writes wait for them (semi-sync) or not."""

    def __init__(self, last_seq: int, timeout: float) -> None:
        self.last_seq = last_seq
        self.timeout = timeout
        # Per connected replica stream (by token): the position it has acknowledged, its name.
        self.acked: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self.mode: Mode = "alone"
        # Writes waiting for a replica: (position, tie-breaker, resolved with True when a replica
        # has it, False when the primary stops waiting and acknowledges alone).
        self._waiters: list[tuple[int, int, asyncio.Future[bool]]] = []
        # Set when the primary drains: its streams end (replicas reconnect to its successor).
        self.draining = asyncio.Event()
        # The primary's last position when it drained with no write able to commit any more:
        # each stream sends what is left up to it and says the primary stopped.
        self.final_seq: int | None = None
        # Moves on with each restore: every stream of an earlier generation ends, telling its
        # replica to copy a snapshot (its data is of the history the restore replaced).
        self.generation = 0
        self._ids = itertools.count()
        self._commit = asyncio.Event()
        # Writes acknowledged without a replica: in all, and in the current run of them (since
        # the primary last left semi-sync): how many, and the wall-clock times of the first and
        # the last.
        self.unreplicated = 0
        self._run_count = 0
        self._run_first = 0.0
        self._run_last = 0.0
        SEMISYNC.set(0)

    # -- commits and the stream ----------------------------------------------------------------

    def committed(self, seq: int) -> None:
        """Called on the event loop after each commit with the batch's last position."""
        self.last_seq = max(self.last_seq, seq)
        event, self._commit = self._commit, asyncio.Event()
        event.set()

    def drain(self, final_seq: int | None) -> None:
        """End every stream now (a stream waiting for a commit is woken). `final_seq`: the last
        position, when no write can commit any more: the streams tell their replicas this
        primary stopped there."""
        self.final_seq = final_seq
        self.draining.set()
        event, self._commit = self._commit, asyncio.Event()
        event.set()

    async def wait_commit(self, after: int, timeout: float) -> None:
        if self.last_seq > after:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._commit.wait()

    # -- replicas --------------------------------------------------------------------------------

    def connect(self, replica: str, seq: int) -> int:
        """Register one replica's stream at position seq; return the stream's token. A replica
        that reconnects gets a new token, so its old stream's late disconnect cannot drop it."""
        stream = next(self._ids)
        self.acked[stream] = seq
        self.names[stream] = replica
        REPLICAS.set(len(self.acked))
        log.info("replica connected", extra=fields(replica=replica, seq=seq, primary=self.last_seq))
        if self.mode != "semi-sync":  # another caught-up replica keeps semi-sync as it is
            self._switch(
                "semi-sync" if seq >= self.last_seq else "degraded", f"{replica} connected"
            )
        return stream

    def disconnect(self, stream: int) -> None:
        self.acked.pop(stream, None)
        replica = self.names.pop(stream, "?")
        REPLICAS.set(len(self.acked))
        log.warning("replica disconnected", extra=fields(replica=replica))
        if not self.acked:
            self._switch("alone", "no replica connected")
            self._release_all()

    def ack(self, stream: int, seq: int) -> None:
        if stream not in self.acked:
            return  # a stream already disconnected
        self.acked[stream] = max(seq, self.acked[stream])
        best = max(self.acked.values())
        while self._waiters and self._waiters[0][0] <= best:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(True)
        if self.mode == "degraded" and best >= self.last_seq:
            self._switch("semi-sync", f"{self.names[stream]} caught up")

    async def replicated(self, seq: int) -> bool:
        """Wait, in semi-sync mode, until a replica has `seq` on disk. Return whether one has;
        False means the write is acknowledged by the primary alone, and is counted as such."""
        if await self._replicated(seq):
            return True
        self._unreplicated()
        return False

    def _unreplicated(self) -> None:
        now = time.time()
        self.unreplicated += 1
        UNREPLICATED.inc()
        if self._run_count == 0:
            self._run_first = now
            log.warning(
                "acknowledging writes without a replica",
                extra=fields(mode=self.mode, first_at=round(now, 3), replicas=len(self.acked)),
            )
        self._run_count += 1
        self._run_last = now

    def _end_run(self, why: str) -> None:
        """Log the run of writes acknowledged without a replica that semi-sync ends."""
        if self._run_count:
            log.warning(
                "writes acknowledged without a replica",
                extra=fields(
                    writes=self._run_count,
                    first_at=round(self._run_first, 3),
                    last_at=round(self._run_last, 3),
                    total=self.unreplicated,
                    reason=why,
                ),
            )
        self._run_count = 0

    async def _replicated(self, seq: int) -> bool:
        if self.mode != "semi-sync":
            return False
        if self.acked and max(self.acked.values()) >= seq:
            return True
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (seq, next(self._ids), future))
        try:
            async with asyncio.timeout(self.timeout):
                return await asyncio.shield(future)
        except TimeoutError:
            if self.mode == "semi-sync":
                DEGRADED.inc()
                self._switch(
                    "degraded",
                    f"no replica acknowledged within {self.timeout}s "
                    "(KVSTACK_SEMISYNC_TIMEOUT); acknowledging writes alone until one catches up",
                )
                self._release_all()
            return False

    def restored(self, seq: int) -> None:
        """After a restore (writes stopped, none in flight): the log continues from `seq`, and
        no replica holds any of it. Forget every stream's position (a late ack of the old
        history must not count as a copy of a new write) and end the streams."""
        self.last_seq = seq
        self.acked.clear()
        self.names.clear()
        REPLICAS.set(0)
        self._release_all()
        self._switch("alone", "the data was restored from a backup; replicas copy it again")
        self.generation += 1
        self.committed(seq)  # wakes the streams waiting for a commit, so they end at once

    def _release_all(self) -> None:
        for _, _, future in self._waiters:
            if not future.done():
                future.set_result(False)
        self._waiters.clear()

    def _switch(self, mode: Mode, why: str) -> None:
        if mode == self.mode:
            return
        self.mode = mode
        SEMISYNC.set(1 if mode == "semi-sync" else 0)
        if mode == "semi-sync":
            self._end_run(why)
        level = logging.WARNING if mode == "degraded" else logging.INFO
        log.log(level, "replication mode", extra=fields(mode=mode, reason=why))


class ReplicationServicer(replication_pb2_grpc.ReplicationServicer):
    """Replication's RPCs. Role answers on every backend; Stream and Snapshot on the primary."""

    def __init__(self, backend: Any) -> None:
        # The backend (kvstack.backend.Backend): its store, role and state appear at start-up.
        self.backend = backend

    async def Role(
        self, request: replication_pb2.RoleRequest, context: Context
    ) -> replication_pb2.RoleResponse:
        backend = self.backend
        store = backend.store
        if store is None:
            role = replication_pb2.BACKEND_ROLE_UNSPECIFIED
            return replication_pb2.RoleResponse(role=role, ordinal=backend.ordinal)
        follower = backend.follower
        return replication_pb2.RoleResponse(
            role=replication_pb2.BACKEND_ROLE_REPLICA
            if follower
            else replication_pb2.BACKEND_ROLE_PRIMARY,
            seq=follower.applied if follower else backend.primary.last_seq,
            readable=follower.readable_now() if follower else True,
            ordinal=backend.ordinal,
            following=follower.following() if follower else False,
        )

    async def _primary(self, context: Context) -> tuple[Store, PrimaryState]:
        backend = self.backend
        if backend.store is None or backend.primary is None:
            from grpc import StatusCode

            await context.abort(
                StatusCode.FAILED_PRECONDITION,
                f"backend ordinal {backend.ordinal} is not the primary (or not open yet); "
                "replicate from the primary",
            )
        return backend.store, backend.primary

    async def Stream(
        self, request_iterator: AsyncIterator[replication_pb2.ReplicaAck], context: Context
    ) -> AsyncIterator[replication_pb2.ChangeBatch]:
        store, state = await self._primary(context)
        requests = aiter(request_iterator)
        hello = await anext(requests)
        replica = hello.replica or context.peer()
        if not store.can_stream_from(hello.applied_seq, hello.history):
            log.info(
                "replica needs a snapshot",
                extra=fields(
                    replica=replica,
                    seq=hello.applied_seq,
                    first=store.first_logged(),
                    same_history=hello.history == store.history(),
                ),
            )
            yield replication_pb2.ChangeBatch(snapshot_required=True, primary_seq=state.last_seq)
            return
        stream = state.connect(replica, hello.applied_seq)

        async def acks() -> None:
            async for ack in requests:
                state.ack(stream, ack.applied_seq)

        reader = asyncio.create_task(acks())
        after = hello.applied_seq
        generation = state.generation
        try:
            # The position at once: a replica that is caught up (a restarted primary's, most
            # often) counts as following now, not after the first heartbeat a second later.
            yield replication_pb2.ChangeBatch(primary_seq=state.last_seq)
            while not reader.done() and not state.draining.is_set():
                if state.generation != generation:  # restored: the replica's data is history
                    log.info(
                        "replica needs a snapshot", extra=fields(replica=replica, why="restore")
                    )
                    yield replication_pb2.ChangeBatch(
                        snapshot_required=True, primary_seq=state.last_seq
                    )
                    return
                try:
                    changes = store.changes_after(after, BATCH_CHANGES)
                except LogGap as gap:  # a slow replica fell out of the log while streaming
                    log.warning(
                        "replica needs a snapshot", extra=fields(replica=replica, why=str(gap))
                    )
                    yield replication_pb2.ChangeBatch(
                        snapshot_required=True, primary_seq=state.last_seq
                    )
                    return
                if changes:
                    after = changes[-1].seq
                    yield replication_pb2.ChangeBatch(
                        changes=changes, primary_seq=max(state.last_seq, after)
                    )
                    continue
                await state.wait_commit(after, HEARTBEAT_S)
                if state.last_seq <= after and not state.draining.is_set():
                    # idle: a heartbeat tells the replica it is current
                    yield replication_pb2.ChangeBatch(primary_seq=state.last_seq)
            final = state.final_seq
            if final is not None and not reader.done() and final - after <= FLUSH_CHANGES:
                # Drained with no write left to commit: send the rest, then say this position
                # is the last, so the replica keeps answering reads while no primary does
                # (instead of only for its staleness bound). A replica further behind is not
                # waited for: the drain would take as long as its catching up.
                while after < final and (changes := store.changes_after(after, BATCH_CHANGES)):
                    after = changes[-1].seq
                    yield replication_pb2.ChangeBatch(changes=changes, primary_seq=final)
                log.info("told the replica this primary stopped", extra=fields(replica=replica))
                yield replication_pb2.ChangeBatch(primary_seq=final, primary_stopped=True)
        except LogGap:  # a replica too far behind to be sent the rest: it copies a snapshot later
            log.info("replica left behind by the drain", extra=fields(replica=replica, seq=after))
        finally:
            reader.cancel()
            state.disconnect(stream)

    async def Snapshot(
        self, request: replication_pb2.SnapshotRequest, context: Context
    ) -> AsyncIterator[replication_pb2.SnapshotChunk]:
        store, _ = await self._primary(context)
        # One read transaction for the whole copy: consistent, and LMDB readers never block
        # the writer.
        history: list[bytes] = []
        for seq, entries in store.snapshot(history=history):
            yield replication_pb2.SnapshotChunk(
                seq=seq,
                entries=[kv_pb2.Entry(key=k, value=v) for k, v in entries],
                history=history[0],
            )


class Follower:
    """A replica's loop: find the primary, copy a snapshot if needed, stream and apply."""

    def __init__(
        self,
        store: Store,
        directory: Directory,
        name: str,
        max_lag: int,
        on_readable: Callable[[bool], Any],
        max_staleness: float = DEFAULT_MAX_STALENESS_S,
    ) -> None:
        self.store = store
        self.directory = directory
        self.name = name
        self.max_lag = max_lag
        self.max_staleness = max_staleness
        self.on_readable = on_readable
        self.applied = store.seq()
        self.history = store.history()  # the primary's history this replica's data is of
        self.readable = False
        self._streamed = False  # the current stream got at least one message from the primary
        # When (monotonic) a message from the primary last arrived, the primary's position it
        # gave, and the address it came from.
        self.heard_at: float | None = None
        self.primary_seq = 0
        self.primary_address = ""
        # When (monotonic) the primary said it stopped (it drained; primary_seq was its last
        # change), until a primary answers again.
        self.stopped_at: float | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._run(), name="follower"),
            asyncio.create_task(self._watch(), name="follower-watch"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def following(self, now: float | None = None) -> bool:
        """Demonstrably following: a message from the primary (a batch, or the heartbeat it
        sends each second when idle) arrived within max_staleness seconds, and this replica has
        applied all but at most max_lag of the changes up to the position that message gave."""
        if self.heard_at is None:
            return False
        now = time.monotonic() if now is None else now
        recent = now - self.heard_at <= self.max_staleness
        return recent and self.primary_seq - self.applied <= self.max_lag

    def primary_gone(self) -> bool:
        """The primary this replica followed is down, not merely silent: no backend says it is
        the primary, and its address left DNS or refuses connections (UNAVAILABLE). A primary
        that only stops answering (frozen, or cut off by the network) may still take writes."""
        if self.heard_at is None or self.directory.primary() is not None:
            return False
        member = self.directory.members.get(self.primary_address)
        return member is None or member.error == "UNAVAILABLE"

    def readable_now(self) -> bool:
        """Whether this replica may answer reads now: following, or caught up (within max_lag
        of the primary's last position) while no primary takes writes: the primary it followed
        went down, or said it stopped and no backend has said it is the primary since."""
        if self.following():
            return True
        if self.primary_seq - self.applied > self.max_lag:
            return False
        if self.stopped_at is not None and not self._primary_since(self.stopped_at):
            return True
        return self.primary_gone()

    def _primary_since(self, moment: float) -> bool:
        """Whether a backend said it is the primary after `moment` (the Directory's view of the
        primary that stopped may be up to a refresh old)."""
        primary = self.directory.primary()
        return primary is not None and primary.answered_at > moment

    def _set_readable(self, readable: bool) -> None:
        if readable != self.readable:
            self.readable = readable
            heard = None if self.heard_at is None else round(time.monotonic() - self.heard_at, 3)
            log.log(
                logging.INFO if readable else logging.WARNING,
                "readable" if readable else "not readable",
                extra=fields(
                    seq=self.applied,
                    primary_seq=self.primary_seq,
                    heard_s_ago=heard,
                    max_staleness_s=self.max_staleness,
                ),
            )
            self.on_readable(readable)

    async def _watch(self) -> None:
        """Turn NOT_SERVING within WATCH_S of the staleness bound passing, whatever the stream
        is doing (a blocked stream delivers nothing that would tell)."""
        while True:
            if self.stopped_at is not None and self._primary_since(self.stopped_at):
                # A primary answers again: only following it counts from now on, even if it
                # goes away before this replica streams from it (it may have taken writes).
                self.stopped_at = None
            self._set_readable(self.readable_now())
            await asyncio.sleep(WATCH_S)

    async def _run(self) -> None:
        waited = 0.0
        again: Member | None = None  # the primary whose working stream was just cut
        cut_at = -CUT_RETRY_S
        while True:
            primary = self.directory.primary()
            if primary is None and again is not None and again.address in self.directory.members:
                # The cut may have failed the Directory's last Role call to it too; do not wait
                # up to a second for the next one to stream again.
                primary = again
            again = None
            if primary is None:
                if waited % 10 < 0.5:
                    log.info(
                        "waiting for the primary", extra=fields(backends=self.directory.describe())
                    )
                await self.directory.wait_changed(0.5)
                waited += 0.5
                continue
            waited = 0.0
            self._streamed = False
            try:
                await self._follow(primary)
            except asyncio.CancelledError:
                # grpc.aio raises CancelledError from a call cancelled locally, e.g. when the
                # Directory closes the channel of a primary whose address left DNS (it was
                # killed). Only a cancellation of this task (stop()) may end the loop: before,
                # that one ended the follower silently and the replica never followed again.
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                log.warning(
                    "lost the primary", extra=fields(primary=primary.address, error="cancelled")
                )
            except (aio.AioRpcError, TimeoutError, StopAsyncIteration) as err:
                detail = err.details() if isinstance(err, aio.AioRpcError) else type(err).__name__
                log.warning("lost the primary", extra=fields(primary=primary.address, error=detail))
            except Exception:  # the follower must never end while the replica runs
                log.exception("following the primary failed", extra=fields(primary=primary.address))
            # A stream that was working and got cut (or ended for a snapshot) starts again at
            # once: every moment without one is a moment the primary acknowledges writes alone.
            # Only a primary that did not answer at all is given a pause before the next try.
            # Retrying for 2 s after a cut is quick (the first tries may still meet the old
            # connection before the channel has seen it reset).
            if self._streamed:
                again, cut_at = primary, time.monotonic()
            elif time.monotonic() - cut_at < CUT_RETRY_S:
                again = primary
                await asyncio.sleep(0.05)
            else:
                await asyncio.sleep(0.5)

    async def _follow(self, primary: Member) -> None:
        call = primary.replication.Stream()
        try:
            # Every wait here is bounded: a call whose channel was closed under it, or whose
            # primary vanished without a reset, may otherwise never complete (grpc/grpc#32005).
            async with asyncio.timeout(5 * HEARTBEAT_S):
                await call.write(
                    replication_pb2.ReplicaAck(
                        applied_seq=self.applied, replica=self.name, history=self.history
                    )
                )
            log.info(
                "streaming from the primary",
                extra=fields(primary=primary.address, seq=self.applied),
            )
            while True:
                async with asyncio.timeout(5 * HEARTBEAT_S):
                    received = await call.read()
                if received is aio.EOF:
                    return
                self._streamed = True
                batch = cast(replication_pb2.ChangeBatch, received)
                self.primary_address = primary.address
                self.stopped_at = None
                if batch.snapshot_required:
                    # Not following until the copy is in: this replica's data may be of a
                    # history a restore replaced, or far behind. No reads from it meanwhile.
                    self.heard_at = None
                    self.primary_seq = batch.primary_seq
                    self._set_readable(False)
                    await self._snapshot(primary)
                    return  # stream again from the snapshot's position
                self.heard_at = time.monotonic()
                self.primary_seq = max(self.primary_seq, batch.primary_seq)
                if batch.changes:
                    changes = list(batch.changes)
                    try:
                        self.applied = await asyncio.to_thread(self.store.apply_changes, changes)
                    except LogGap as gap:  # never skip a change: start over from a copy
                        log.warning("the primary's changes have a gap", extra=fields(why=str(gap)))
                        await self._snapshot(primary)
                        return
                    LAG_SECONDS.observe(max(0.0, time.time() - changes[-1].committed_at))
                    # Bounded like the read: a write to a primary that vanished (SIGKILL, no
                    # RST) would otherwise wait for TCP to give up.
                    async with asyncio.timeout(5 * HEARTBEAT_S):
                        await call.write(
                            replication_pb2.ReplicaAck(applied_seq=self.applied, replica=self.name)
                        )
                LAG.set(max(0, batch.primary_seq - self.applied))
                if batch.primary_stopped:
                    self.stopped_at = time.monotonic()
                    log.info(
                        "the primary stopped; reads go on here until a primary answers",
                        extra=fields(primary=primary.address, seq=self.applied),
                    )
                self._set_readable(self.readable_now())
        finally:
            call.cancel()

    async def _snapshot(self, primary: Member) -> None:
        log.info("copying a snapshot from the primary", extra=fields(primary=primary.address))
        # Chunks go into one LMDB write transaction on a worker thread as they arrive, so a
        # copy needs memory for a few chunks, not the database; anything but a clean end of the
        # copy aborts that transaction and the replica keeps what it had.
        pipe: queue.SimpleQueue[Chunk | BaseException | None] = queue.SimpleQueue()

        def chunks() -> Iterator[Chunk]:
            while (item := pipe.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item

        history: list[bytes] = []  # the copy's history, as its chunks say
        loader = asyncio.ensure_future(
            asyncio.to_thread(self.store.load_snapshot, chunks(), lambda: history[-1])
        )
        call = primary.replication.Snapshot(replication_pb2.SnapshotRequest())
        seq = 0
        try:
            while not loader.done():  # done early: it failed, and `await loader` says why
                # Bounded per chunk, not in total: a large copy may take long, but a primary
                # that vanished mid-copy (no RST) must not stall this replica forever.
                async with asyncio.timeout(SNAPSHOT_CHUNK_S):
                    received = await call.read()
                if received is aio.EOF:
                    pipe.put(None)
                    break
                chunk = cast(replication_pb2.SnapshotChunk, received)
                seq = chunk.seq
                history[:] = [chunk.history]
                pipe.put((chunk.seq, [(e.key, e.value) for e in chunk.entries]))
                while pipe.qsize() >= SNAPSHOT_QUEUED and not loader.done():
                    await asyncio.sleep(0.01)  # the disk is behind the network: wait for it
        except BaseException:
            pipe.put(ConnectionAbortedError("the copy of the snapshot stopped"))
            await asyncio.gather(loader, return_exceptions=True)  # the transaction is aborted
            raise
        finally:
            call.cancel()
        entries = await loader
        self.applied = seq
        self.history = history[-1]
        log.info("snapshot loaded", extra=fields(seq=seq, entries=entries))
