"""Backups and restores between real backend processes over loopback (kvstack.v1.Backup), with
real LMDB files: the copy is consistent while writes go on, opens with LMDB, and restores onto
the primary; the replicas then hold exactly the backup, whatever they held before."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import lmdb
import pytest

from kvstack import backup, validation
from kvstack.dev.processes import ServiceProcess, free_port
from kvstack.v1 import backup_pb2, backup_pb2_grpc, kv_pb2, kv_pb2_grpc
from tests.conftest import Spawn


class Pair:
    """A primary and a replica (ordinals 0 and 1) in their own data directories."""

    def __init__(self, spawn: Spawn, root: Path, **env: str) -> None:
        self.spawn, self.root, self.env = spawn, root, env
        self.ports = [free_port(), free_port()]
        self.procs: dict[int, ServiceProcess] = {}

    def start(self, ordinal: int) -> ServiceProcess:
        peers = ",".join(f"127.0.0.1:{p}" for p in self.ports)
        env = {
            "KVSTACK_DATA_DIR": str(self.root / f"data-{ordinal}"),
            "KVSTACK_ORDINAL": str(ordinal),
            "KVSTACK_BACKEND_TARGET": peers,
            **self.env,
        }
        self.procs[ordinal] = self.spawn("backend", env, port=self.ports[ordinal])
        return self.procs[ordinal].wait_serving()

    def up(self) -> Pair:
        self.start(0)
        self.start(1)
        return self

    @property
    def primary(self) -> str:
        return self.procs[0].target

    def targets(self) -> list[str]:
        return [p.target for p in self.procs.values() if p.proc and p.proc.poll() is None]


def stub(target: str) -> kv_pb2_grpc.KeyValueStub:
    return kv_pb2_grpc.KeyValueStub(grpc.insecure_channel(target))


def contents(target: str) -> dict[bytes, bytes]:
    """Every entry of one backend, read from it directly (page after page)."""
    found: dict[bytes, bytes] = {}
    token = b""
    while True:
        page = stub(target).List(kv_pb2.ListRequest(page_size=1000, page_token=token), timeout=10)
        found.update((e.key, e.value) for e in page.entries)
        if not page.next_page_token:
            return found
        token = page.next_page_token


def file_contents(path: Path) -> dict[bytes, bytes]:
    env = lmdb.open(str(path), subdir=False, readonly=True, lock=False, max_dbs=8)
    with env.begin() as txn:
        kv = env.open_db(b"kv", txn=txn, create=False)
        held = {bytes(k): bytes(v) for k, v in txn.cursor(db=kv)}
    env.close()
    return held


def put_many(target: str, prefix: str, count: int) -> dict[bytes, bytes]:
    kv = stub(target)
    written = {}
    for i in range(count):
        key, value = f"{prefix}{i:06d}".encode(), f"{prefix}-value-{i}".encode()
        kv.Put(kv_pb2.PutRequest(key=key, value=value), timeout=10)
        written[key] = value
    return written


def converged(pair: Pair, expected: dict[bytes, bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        held: dict[str, dict[bytes, bytes]] = {}
        for target in pair.targets():
            try:
                held[target] = contents(target)
            except grpc.RpcError:  # a replica copying the snapshot refuses reads meanwhile
                held[target] = {}
        if all(h == expected for h in held.values()):
            return
        if time.monotonic() > deadline:
            summary = {
                t: (len(h), len(set(h) - set(expected)), len(set(expected) - set(h)))
                for t, h in held.items()
            }
            pytest.fail(f"(entries, extra, missing) per backend after {timeout} s: {summary}")
        time.sleep(0.2)


def test_a_backup_taken_during_writes_is_consistent_and_opens_with_lmdb(
    spawn: Spawn, tmp_path: Path
) -> None:
    """Writers keep writing while the backup runs. Every write acknowledged before it began is
    in the copy; the manifest's count and position are the copy's own; LMDB opens the file."""
    pair = Pair(spawn, tmp_path).up()
    put_many(pair.primary, "seed/", 300)
    acked: list[bytes] = []
    stop = threading.Event()

    def writer(n: int) -> None:
        kv = stub(pair.primary)
        i = 0
        while not stop.is_set():
            key = f"w{n}/{i:06d}".encode()
            kv.Put(kv_pb2.PutRequest(key=key, value=key + b"-v"), timeout=10)
            acked.append(key)
            i += 1

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)
        before = list(acked)
        out = tmp_path / "b.mdb"
        manifest = backup.take(pair.primary, out)
        time.sleep(0.5)
        during_and_after = len(acked) - len(before)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert during_and_after > 0, "the writes must go on during the backup"
    held = file_contents(out)
    assert all(held.get(k) == k + b"-v" for k in before), "an acknowledged write is missing"
    assert manifest.keys == len(held)
    assert manifest.keys >= 300 + len(before)
    assert manifest.keys < 300 + len(acked), "the copy is of one moment, not of the end"
    on_disk = backup.Manifest.parse(backup.manifest_path(out).read_text(), "manifest")
    assert on_disk == manifest
    assert manifest.bytes == out.stat().st_size
    assert backup.read_copy(out) == (manifest.seq, manifest.keys)
    assert backup.check_file(out) == manifest
    assert not list(tmp_path.glob("*.partial"))


def test_restore_into_an_empty_pair_then_the_replica_copies_it(
    spawn: Spawn, tmp_path: Path
) -> None:
    """The disaster case: every volume lost. A new, empty pair takes the restore without
    --force; the primary continues from the backup's position and the replica holds exactly
    the backup; new writes replicate on top of it."""
    old = Pair(spawn, tmp_path / "old").up()
    written = put_many(old.primary, "k/", 1500)
    out = tmp_path / "b.mdb"
    manifest = backup.take(old.primary, out)
    for proc in old.procs.values():
        proc.stop()

    new = Pair(spawn, tmp_path / "new").up()
    reply = backup.restore(new.primary, out, force=False)
    assert (reply.keys, reply.replaced, reply.lost, reply.seq) == (1500, 0, 0, manifest.seq)
    converged(new, written)
    more = put_many(new.primary, "after/", 20)
    converged(new, {**written, **more})


def test_restore_over_live_data_needs_force_and_leaves_no_removed_key_on_any_replica(
    spawn: Spawn, tmp_path: Path
) -> None:
    """Over live data: refused without force (nothing changed, the counts said); with force the
    keys written after the backup are gone from the primary and from every replica, including
    one that was down during the restore and comes back at a position of the old history that
    the new history has passed."""
    pair = Pair(spawn, tmp_path, KVSTACK_LOG_RETAIN="100000").up()
    kept = put_many(pair.primary, "kept/", 200)
    out = tmp_path / "b.mdb"
    backup.take(pair.primary, out)
    later = put_many(pair.primary, "later/", 50)
    converged(pair, {**kept, **later})
    seq_before = backup.read_copy(out)[0] + 50

    with pytest.raises(grpc.RpcError) as refused:
        backup.restore(pair.primary, out, force=False)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    message = refused.value.details() or ""
    assert "holds 250 keys" in message
    assert "replace 200" in message
    assert "lose 50" in message
    assert "--force" in message
    assert "Nothing was changed" in message
    converged(pair, {**kept, **later})

    pair.procs[1].stop()  # the replica is down during the restore, at position seq_before
    reply = backup.restore(pair.primary, out, force=True)
    assert (reply.keys, reply.replaced, reply.lost) == (200, 200, 50)
    assert contents(pair.primary) == kept
    # The new history passes the old replica's position: only its history tells them apart.
    newer = put_many(pair.primary, "newer/", 60)
    assert reply.seq + 60 > seq_before
    pair.start(1)
    converged(pair, {**kept, **newer})


def restore_raw(target: str, manifest: str, data: bytes) -> grpc.RpcError:
    """Call Restore directly (no client-side check), expecting a refusal."""

    def requests() -> Iterator[backup_pb2.RestoreChunk]:
        yield backup_pb2.RestoreChunk(manifest=manifest)
        for i in range(0, len(data), 1 << 20):
            yield backup_pb2.RestoreChunk(data=data[i : i + (1 << 20)])

    with grpc.insecure_channel(target) as channel, pytest.raises(grpc.RpcError) as refused:
        backup_pb2_grpc.BackupStub(channel).Restore(requests(), timeout=30)
    return refused.value


def test_the_primary_refuses_a_bad_file_itself_and_changes_nothing(
    spawn: Spawn, tmp_path: Path
) -> None:
    """The backend never trusts its caller: a flipped byte, a cut file, another file, a newer
    format sent straight to the RPC are refused with what is wrong, and nothing changes."""
    pair = Pair(spawn, tmp_path).up()
    held = put_many(pair.primary, "x/", 100)
    out = tmp_path / "b.mdb"
    backup.take(pair.primary, out)
    manifest = backup.manifest_path(out).read_text()
    good = out.read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x01
    newer = json.dumps({**json.loads(manifest), "format_version": 99})
    cases = [
        (manifest, bytes(flipped), "corrupted: its SHA-256"),
        (manifest, good[:-4096], "truncated"),
        (manifest, good + b"junk", "longer than"),
        ('{"hello": 1}', good, "not a kvstack backup manifest"),
        (newer, good, "format 99, newer than this kvstack reads"),
    ]
    for text, data, said in cases:
        err = restore_raw(pair.primary, text, data)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (said, err)
        assert said in (err.details() or ""), (said, err.details())
    assert contents(pair.primary) == held
    assert not (tmp_path / "data-0" / "restore-incoming.mdb").exists()
    # And the primary still takes the good one (forced: it holds the same keys).
    backup.restore(pair.primary, out, force=True)
    converged(pair, held)


def test_a_replica_refuses_backup_and_restore(spawn: Spawn, tmp_path: Path) -> None:
    pair = Pair(spawn, tmp_path).up()
    replica = grpc.insecure_channel(pair.procs[1].target)
    with replica, pytest.raises(grpc.RpcError) as refused:
        list(backup_pb2_grpc.BackupStub(replica).Backup(backup_pb2.BackupRequest()))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not the primary" in (refused.value.details() or "")
    # The client finds the primary among every address a target names.
    assert backup.find_primary(pair.procs[0].target) == pair.primary
    with pytest.raises(backup.BadTarget, match="not the primary"):
        backup.find_primary(pair.procs[1].target)


def test_writes_during_a_restore_are_refused_and_none_acknowledged_after_it_is_lost(
    spawn: Spawn, tmp_path: Path
) -> None:
    """Writers keep writing straight to the primary through a restore: any write refused says a
    restore is running (UNAVAILABLE, which callers retry), and every write acknowledged after
    the restore returned is there afterwards, on the primary and the replica. (The restore's
    window is short here, so there may be no refusal at all: this checks what a refusal says
    and that nothing acknowledged after it is lost, not that the write stop exists.)"""
    pair = Pair(spawn, tmp_path).up()
    base = put_many(pair.primary, "base/", 3000)
    out = tmp_path / "b.mdb"
    backup.take(pair.primary, out)
    stop = threading.Event()
    acked: list[tuple[float, bytes]] = []
    refusals: list[str] = []

    def writer(n: int) -> None:
        kv = stub(pair.primary)
        i = 0
        while not stop.is_set():
            key = f"during{n}/{i:06d}".encode()
            i += 1
            try:
                kv.Put(kv_pb2.PutRequest(key=key, value=b"v"), timeout=10)
            except grpc.RpcError as err:
                refusals.append(f"{err.code().name}: {err.details()}")
                continue
            acked.append((time.monotonic(), key))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        backup.restore(pair.primary, out, force=True)
        ended = time.monotonic()
        time.sleep(1.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert all("UNAVAILABLE: a restore from a backup" in r for r in refusals), refusals[:3]
    after = {key for at, key in acked if at > ended}
    assert after, "writes must resume after the restore"
    held = contents(pair.primary)
    assert after <= set(held), "a write acknowledged after the restore is missing"
    assert set(base) <= set(held)
    converged(pair, held)


def test_one_restore_at_a_time(spawn: Spawn, tmp_path: Path) -> None:
    """A second restore while one is arriving is refused at once; the first then completes."""
    pair = Pair(spawn, tmp_path).up()
    put_many(pair.primary, "one/", 10)
    out = tmp_path / "b.mdb"
    backup.take(pair.primary, out)
    manifest = backup.manifest_path(out).read_text()
    go = threading.Event()

    def slow() -> Iterator[backup_pb2.RestoreChunk]:
        yield backup_pb2.RestoreChunk(manifest=manifest, force=True)
        go.wait(30)
        yield backup_pb2.RestoreChunk(data=out.read_bytes())

    channel = grpc.insecure_channel(pair.primary)
    first = backup_pb2_grpc.BackupStub(channel).Restore.future(slow(), timeout=60)
    time.sleep(1.0)  # the first restore's manifest has arrived
    err = restore_raw(pair.primary, manifest, out.read_bytes())
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "another restore is running" in (err.details() or "")
    go.set()
    assert first.result().keys == 10
    channel.close()


def test_backups_abandoned_mid_copy_leave_nothing_behind(spawn: Spawn, tmp_path: Path) -> None:
    """A caller that leaves a backup after its first chunk (five times, while the copy still
    streams) leaves no descriptor open and no error in the primary's log, and the next backup
    is whole. (What it cannot show: the pipe closed under a thread still reading it, which
    would then read whatever file took the number next; that window is a few milliseconds, and
    the handler now closes the pipe only once its read has returned.)"""
    pair = Pair(spawn, tmp_path).up()
    kv = stub(pair.primary)
    written = {}
    for i in range(6):  # six values of 1 MiB: a copy of several chunks
        key, value = f"big/{i}".encode(), bytes([65 + i]) * (validation.DEFAULT_MAX_VALUE_BYTES)
        kv.Put(kv_pb2.PutRequest(key=key, value=value), timeout=10)
        written[key] = value
    pid = pair.procs[0].proc.pid if pair.procs[0].proc else 0

    def descriptors() -> int:
        return len(os.listdir(f"/proc/{pid}/fd"))

    backup.take(pair.primary, tmp_path / "first.mdb")  # whatever a backup opens once is open
    before = descriptors()
    for _ in range(5):
        with grpc.insecure_channel(pair.primary) as channel:
            call = backup_pb2_grpc.BackupStub(channel).Backup(
                backup_pb2.BackupRequest(), timeout=30
            )
            assert next(call).data  # the first chunk, then the caller leaves
            call.cancel()
    deadline = time.monotonic() + 10
    while descriptors() > before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert descriptors() <= before, f"{descriptors() - before} descriptors left open"
    out = tmp_path / "after.mdb"
    backup.take(pair.primary, out)
    assert file_contents(out) == written
    log = pair.procs[0].logs()
    # (grpc itself logs a traceback for a message written to a call its caller cancelled.)
    for trouble in ("Bad file descriptor", "never retrieved"):
        assert trouble not in log, log[-3000:]
