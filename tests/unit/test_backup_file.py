"""The backup file format (kvstack.backup) on real LMDB files: what passes the checks, and a
message that says what is wrong for each file that does not."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lmdb
import pytest

from kvstack import backup
from kvstack.backend.store import NotEmpty, Store, Write


def make_backup(tmp_path: Path, keys: int = 500) -> tuple[Path, backup.Manifest]:
    """A backup as the primary writes it: a compacted copy of one read transaction."""
    store = Store(tmp_path / "data", 1 << 26)
    store.apply([Write("put", f"k{i:05d}".encode(), b"v" * 40) for i in range(keys)])
    path = tmp_path / "b.mdb"
    with store.env.begin() as txn, path.open("wb") as file:
        store.env.copyfd(file.fileno(), compact=True, txn=txn)
    store.close()
    manifest = backup.Manifest(
        seq=keys,
        keys=keys,
        bytes=path.stat().st_size,
        sha256=backup.sha256_of(path),
        kvstack_version="test",
        created_at=backup.now(),
    )
    backup.manifest_path(path).write_text(manifest.to_json())
    return path, manifest


def refused(path: Path) -> str:
    with pytest.raises(backup.BadBackup) as err:
        backup.check_file(path)
    return str(err.value)


def test_a_good_backup_passes_and_is_a_plain_lmdb_file(tmp_path: Path) -> None:
    path, manifest = make_backup(tmp_path)
    assert backup.check_file(path) == manifest
    env = lmdb.open(str(path), subdir=False, readonly=True, lock=False, max_dbs=8)
    with env.begin() as txn:
        kv = env.open_db(b"kv", txn=txn, create=False)
        assert txn.get(b"k00007", db=kv) == b"v" * 40
        assert txn.stat(kv)["entries"] == 500
    assert json.loads(backup.manifest_path(path).read_text())["format"] == "kvstack-backup"


def test_a_truncated_file_is_refused(tmp_path: Path) -> None:
    path, manifest = make_backup(tmp_path)
    os.truncate(path, manifest.bytes - 4096)
    message = refused(path)
    assert "is truncated" in message
    assert f"of the {manifest.bytes} bytes" in message
    assert "nothing was changed" in message


def test_one_flipped_byte_is_refused_by_its_checksum(tmp_path: Path) -> None:
    path, _ = make_backup(tmp_path)
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x40
    path.write_bytes(bytes(data))
    message = refused(path)
    assert "is corrupted: its SHA-256" in message
    assert "use another copy" in message


def test_a_file_that_is_not_a_backup_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "notes.txt"
    other.write_text("hello\n")
    assert "not a kvstack backup: there is no manifest notes.txt.manifest.json" in refused(other)
    # A manifest beside it that is not kvstack's
    backup.manifest_path(other).write_text('{"name": "something else"}')
    assert "is not a kvstack backup manifest" in refused(other)
    assert "does not exist" in refused(tmp_path / "missing.mdb")


def test_an_lmdb_file_of_something_else_is_refused(tmp_path: Path) -> None:
    env = lmdb.open(str(tmp_path / "other"), max_dbs=2, map_size=1 << 22)
    with env.begin(write=True) as txn:
        txn.put(b"a", b"b")
    path = tmp_path / "other.mdb"
    with env.begin() as txn, path.open("wb") as file:
        env.copyfd(file.fileno(), compact=True, txn=txn)
    env.close()
    manifest = backup.Manifest(0, 1, path.stat().st_size, backup.sha256_of(path), "x", "t")
    backup.manifest_path(path).write_text(manifest.to_json())
    assert "without kvstack's databases" in refused(path)


def test_a_newer_format_is_refused_saying_which_version_reads_it(tmp_path: Path) -> None:
    path, _ = make_backup(tmp_path)
    raw = json.loads(backup.manifest_path(path).read_text())
    raw.update(format_version=backup.FORMAT_VERSION + 1, kvstack_version="v9.0.0")
    backup.manifest_path(path).write_text(json.dumps(raw))
    message = refused(path)
    assert f"format {backup.FORMAT_VERSION + 1}, newer than this kvstack reads" in message
    assert "v9.0.0" in message


def test_a_manifest_of_another_backup_is_refused(tmp_path: Path) -> None:
    path, _ = make_backup(tmp_path / "a", keys=500)
    other, _ = make_backup(tmp_path / "b", keys=501)
    backup.manifest_path(path).write_bytes(backup.manifest_path(other).read_bytes())
    message = refused(path)
    assert "not the file this manifest describes" in message or "corrupted" in message


def test_restore_from_refuses_live_data_unless_forced_and_starts_a_new_history(
    tmp_path: Path,
) -> None:
    path, manifest = make_backup(tmp_path, keys=10)
    live = Store(tmp_path / "live", 1 << 26)
    live.apply([Write("put", b"k00001", b"old"), Write("put", b"extra", b"x")])
    source = backup.open_copy(path)
    with pytest.raises(NotEmpty) as err:
        live.restore_from(source, manifest.seq, force=False)
    assert (err.value.counts.replaced, err.value.counts.lost) == (1, 1)
    assert live.get(b"extra") == b"x"
    assert live.seq() == 2
    assert live.history() == b""
    counts = live.restore_from(source, manifest.seq, force=True)
    assert (counts.before, counts.replaced, counts.lost, counts.after) == (2, 1, 1, 10)
    assert live.get(b"extra") is None
    assert live.get(b"k00001") == b"v" * 40
    assert live.seq() == manifest.seq
    assert len(live.history()) == 16
    assert not live.can_stream_from(manifest.seq)  # a replica of the old history copies again
    assert live.can_stream_from(manifest.seq, live.history())
    source.close()
