"""Backups of the primary's data, and restoring one: the file format, its checks, and the client.

A backup is two files side by side:

- FILE: a copy of the primary's LMDB environment in LMDB's own format, as `mdb_copy -c` writes
  it (mdb_env_copyfd2 with MDB_CP_COMPACT), taken in ONE read transaction while writes go on.
  The standard tools open it: `mdb_stat -n -a FILE`, `mdb_dump -n -s kv FILE`, or
  `lmdb.open(FILE, subdir=False, readonly=True)`.
- FILE.manifest.json: what it is (`format`, `format_version`), the change-log position it
  corresponds to (`seq`), its number of keys, its size and SHA-256, the kvstack version that
  took it and when.

Restoring checks both before anything is changed, on this side and again on the primary's:
a file that is truncated, corrupted (its checksum), not a kvstack backup, or of a newer format
is refused with a message that says which.

`python -m kvstack.backup take|restore|check ...` is the client the `kvstack backup` and
`kvstack restore` verbs run, in-process (Kubernetes, through `kubectl port-forward`) or in a
one-shot container on the local stack's backend network (kvstack.ops.local).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import lmdb

from kvstack import package_version, runtime, validation
from kvstack.v1 import backup_pb2, backup_pb2_grpc, replication_pb2, replication_pb2_grpc

FORMAT = "kvstack-backup"
FORMAT_VERSION = 1  # the newest this code reads and the one it writes
MANIFEST_SUFFIX = ".manifest.json"
COPY_FORMAT = "LMDB environment copy, compacted (mdb_env_copyfd2 MDB_CP_COMPACT, mdb_copy -c)"
PROGRESS_S = 2.0  # seconds between two progress lines
MiB = 1 << 20


class BadBackup(Exception):
    """A file that is not a restorable kvstack backup; the message says why and what to do."""


@dataclass(frozen=True)
class Manifest:
    seq: int  # the change-log position the copy corresponds to
    keys: int
    bytes: int
    sha256: str
    kvstack_version: str
    created_at: str  # RFC 3339, UTC
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    copy_format: str = COPY_FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def parse(cls, text: str, where: str) -> Manifest:
        """The manifest in `text` (read from `where`); BadBackup when it is not one this
        version of kvstack can restore."""
        try:
            raw = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raw = None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise BadBackup(
                f'{where} is not a kvstack backup manifest (no "format": "{FORMAT}"); '
                "give the file `kvstack backup` wrote, with its .manifest.json beside it"
            )
        version = raw.get("format_version")
        if not isinstance(version, int) or version < 1:
            raise BadBackup(f"{where} has no valid format_version: it is damaged; use another copy")
        if version > FORMAT_VERSION:
            raise BadBackup(
                f"{where} is of backup format {version}, newer than this kvstack reads "
                f"(up to {FORMAT_VERSION}; it was written by kvstack "
                f"{raw.get('kvstack_version', '?')}): restore it with that version or newer"
            )
        try:
            return cls(
                seq=_count(raw["seq"]),
                keys=_count(raw["keys"]),
                bytes=_count(raw["bytes"]),
                sha256=str(raw["sha256"]),
                kvstack_version=str(raw["kvstack_version"]),
                created_at=str(raw["created_at"]),
                format_version=version,
            )
        except (KeyError, TypeError, ValueError) as err:
            raise BadBackup(
                f"{where} lacks a valid {err}: it is damaged; use another copy of the backup"
            ) from None


def _count(value: Any) -> int:
    if not isinstance(value, int) or value < 0:
        raise ValueError(repr(value))
    return value


def manifest_path(path: Path) -> Path:
    return path.with_name(path.name + MANIFEST_SUFFIX)


def kvstack_version() -> str:
    """This kvstack's version: the image's (KVSTACK_VERSION), else the installed package's."""
    return os.environ.get("KVSTACK_VERSION") or package_version()


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(MiB):
            digest.update(block)
    return digest.hexdigest()


def open_copy(path: Path) -> lmdb.Environment:
    """A backup's LMDB environment, read-only, without a lock file (none is written beside)."""
    return lmdb.open(str(path), subdir=False, readonly=True, lock=False, max_dbs=8)


def read_copy(path: Path) -> tuple[int, int]:
    """(position, keys) of an LMDB copy of a kvstack backend; BadBackup when it is not one."""
    try:
        env = open_copy(path)
    except lmdb.Error as err:
        raise BadBackup(f"{path} is not an LMDB file ({err}): not a kvstack backup") from None
    try:
        with env.begin() as txn:
            try:
                kv = env.open_db(b"kv", txn=txn, create=False)
                meta = env.open_db(b"meta", txn=txn, create=False)
            except lmdb.Error:
                raise BadBackup(
                    f"{path} is an LMDB file without kvstack's databases (kv, meta): "
                    "not a kvstack backup"
                ) from None
            raw = txn.get(b"seq", db=meta)
            return int.from_bytes(raw, "big") if raw else 0, int(txn.stat(kv)["entries"])
    except lmdb.Error as err:
        raise BadBackup(f"{path} cannot be read as LMDB ({err}): it is damaged") from None
    finally:
        env.close()


def check_copy(path: Path, manifest: Manifest, name: str = "") -> None:
    """Check the copy at `path` against its manifest: size, SHA-256, then its contents.
    BadBackup says what is wrong; `name` is how to call the file in that message."""
    name = name or str(path)
    size = path.stat().st_size
    if size < manifest.bytes:
        raise BadBackup(
            f"{name} is truncated: {size} of the {manifest.bytes} bytes its manifest gives. "
            "Copy the whole file again (or take a new backup); nothing was changed"
        )
    if size > manifest.bytes:
        raise BadBackup(
            f"{name} has {size} bytes, its manifest says {manifest.bytes}: it is not the file "
            "this manifest describes; nothing was changed"
        )
    digest = sha256_of(path)
    if digest != manifest.sha256:
        raise BadBackup(
            f"{name} is corrupted: its SHA-256 is {digest}, its manifest says "
            f"{manifest.sha256}. It changed after the backup was taken (a bad copy or disk): "
            "use another copy of the backup; nothing was changed"
        )
    seq, keys = read_copy(path)
    if (seq, keys) != (manifest.seq, manifest.keys):
        raise BadBackup(
            f"{name} holds {keys} keys at position {seq}, its manifest says {manifest.keys} at "
            f"{manifest.seq}: they do not belong together; nothing was changed"
        )


def check_file(path: Path) -> Manifest:
    """The manifest of the backup at `path`, once the file has passed every check."""
    if not path.is_file():
        raise BadBackup(f"{path} does not exist (or is not a file): give the backup's path")
    beside = manifest_path(path)
    if not beside.is_file():
        raise BadBackup(
            f"{path} is not a kvstack backup: there is no manifest {beside.name} beside it "
            "(`kvstack backup` writes the two files together; copy them together)"
        )
    manifest = Manifest.parse(beside.read_text(errors="replace"), str(beside))
    check_copy(path, manifest)
    return manifest


# -- the client ---------------------------------------------------------------------------------


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _mib(count: int) -> str:
    return f"{count / MiB:.1f} MiB"


def _channel(address: str) -> grpc.Channel:
    options = [
        *runtime.CHANNEL_OPTIONS,
        ("grpc.max_receive_message_length", validation.GRPC_MESSAGE_LIMIT_BYTES),
    ]
    return grpc.insecure_channel(address, options=options)


def _addresses(target: str) -> list[str]:
    """Every address `target` (HOST:PORT, or dns:///HOST:PORT) stands for."""
    host, _, port = target.removeprefix("dns:///").rpartition(":")
    host = host.strip("[]")
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (OSError, ValueError) as err:
        raise BadTarget(f"cannot resolve the backend address {target} ({err})") from None
    found = []
    for info in infos:
        ip = str(info[4][0])
        address = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
        if address not in found:
            found.append(address)
    return found


class BadTarget(Exception):
    """No primary found where the caller said; the message says what was seen."""


def find_primary(target: str) -> str:
    """The address of the backend at `target` that says it is the primary."""
    seen = []
    for address in _addresses(target):
        with _channel(address) as channel:
            try:
                role = replication_pb2_grpc.ReplicationStub(channel).Role(
                    replication_pb2.RoleRequest(), timeout=5
                )
            except grpc.RpcError as err:
                seen.append(f"{address}: {err.code().name}")
                continue
        if role.role == replication_pb2.BACKEND_ROLE_PRIMARY:
            return address
        seen.append(f"{address}: backend ordinal {role.ordinal}, not the primary")
    raise BadTarget(
        f"no backend at {target} says it is the primary ({'; '.join(seen) or 'no address'}). "
        "Is the stack up and its backend healthy (`kvstack status TARGET`)? Retry once it is"
    )


class Progress:
    """Progress in words, at most every PROGRESS_S seconds."""

    def __init__(self, what: str, total: int) -> None:
        self.what, self.total = what, total
        self.started = self.shown = time.monotonic()

    def update(self, done: int) -> None:
        if time.monotonic() - self.shown < PROGRESS_S:
            return
        self.shown = time.monotonic()
        share = f" ({100 * done // self.total}%)" if self.total else ""
        say(f"{self.what}: {_mib(done)} of {'about ' if self.what == 'backup' else ''}"
            f"{_mib(self.total)}{share}, {self.shown - self.started:.0f} s")  # fmt: skip

    def elapsed(self) -> float:
        return time.monotonic() - self.started


def _received(manifest: Manifest | None, size: int, digest: str) -> Manifest:
    """The manifest of a copy received whole: as many bytes, and the same, as were sent."""
    if manifest is None:
        raise BadTarget("the primary ended the backup without its manifest: retry")
    if (size, digest) != (manifest.bytes, manifest.sha256):
        raise BadTarget(
            f"the copy received ({size} bytes, SHA-256 {digest}) is not the one the primary "
            f"sent ({manifest.bytes} bytes, {manifest.sha256}): retry"
        )
    return manifest


def take(target: str, output: Path, shown: str = "") -> Manifest:
    """Take a backup of the primary at `target` into `output` and its manifest beside it
    (`shown`: how to name the file to the person, e.g. its path outside a container)."""
    shown = shown or str(output)
    primary = find_primary(target)
    say(f"backup: copying the primary ({primary}) in one read transaction; writes go on")
    partial = output.with_name(output.name + ".partial")
    digest = hashlib.sha256()
    size = 0
    manifest: Manifest | None = None
    progress = Progress("backup", 0)
    try:
        with _channel(primary) as channel, partial.open("wb") as file:
            for chunk in backup_pb2_grpc.BackupStub(channel).Backup(backup_pb2.BackupRequest()):
                if chunk.estimated_bytes:
                    progress.total = chunk.estimated_bytes
                if chunk.data:
                    file.write(chunk.data)
                    digest.update(chunk.data)
                    size += len(chunk.data)
                    progress.update(size)
                if chunk.manifest:
                    manifest = Manifest.parse(chunk.manifest, "the primary's manifest")
            file.flush()
            os.fsync(file.fileno())
        manifest = _received(manifest, size, digest.hexdigest())
        check_copy(partial, manifest, shown)
        partial.replace(output)
        manifest_path(output).write_text(manifest.to_json())
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    say(
        f"backup: done in {progress.elapsed():.1f} s: {manifest.keys} keys at change-log "
        f"position {manifest.seq}, {_mib(manifest.bytes)}, SHA-256 {manifest.sha256[:16]}... -> "
        f"{shown} (manifest {manifest_path(output).name} beside it; keep the two together)"
    )
    return manifest


def _restore_requests(
    path: Path, manifest: Manifest, force: bool, progress: Progress
) -> Iterator[backup_pb2.RestoreChunk]:
    yield backup_pb2.RestoreChunk(manifest=manifest.to_json(), force=force)
    sent = 0
    with path.open("rb") as file:
        while data := file.read(validation.BACKUP_CHUNK_BYTES):
            sent += len(data)
            progress.update(sent)
            yield backup_pb2.RestoreChunk(data=data)
    say(
        f"restore: {_mib(sent)} sent; the primary checks the copy and loads it "
        "(writes are refused until it ends)"
    )


def restore(target: str, path: Path, force: bool, shown: str = "") -> backup_pb2.RestoreResponse:
    """Check the backup at `path`, then restore it onto the primary at `target` (`shown`: how
    to name the file to the person)."""
    manifest = check_file(path)
    say(
        f"restore: {shown or path} checked (size, SHA-256, LMDB contents): {manifest.keys} keys at "
        f"change-log position {manifest.seq}, taken {manifest.created_at} by kvstack "
        f"{manifest.kvstack_version}"
    )
    primary = find_primary(target)
    say(f"restore: sending it to the primary ({primary})")
    progress = Progress("restore", manifest.bytes)
    with _channel(primary) as channel:
        reply: backup_pb2.RestoreResponse = backup_pb2_grpc.BackupStub(channel).Restore(
            _restore_requests(path, manifest, force, progress)
        )
    held = reply.replaced + reply.lost
    say(
        f"restore: done in {progress.elapsed():.1f} s: the primary holds the backup's "
        f"{reply.keys} keys and continues from change-log position {reply.seq}"
        + (
            f"; of the {held} keys it held, {reply.replaced} replaced, {reply.lost} lost"
            if held
            else ""
        )
        + ". The replicas copy it next, as after a scale-out: `kvstack status` shows when "
        "they are ready"
    )
    return reply


def describe(err: grpc.RpcError) -> str:
    code = err.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return (
            f"the primary cannot be reached ({err.details()}): is the stack up "
            "(`kvstack status TARGET`)? Retry once its backend is healthy"
        )
    return f"{code.name}: {err.details()}"


def run(action: Callable[[], object]) -> int:
    """Run a take/restore/check, turning every expected failure into one line and exit 1."""
    try:
        action()
    except (BadBackup, BadTarget) as err:
        say(f"kvstack backup: error: {err}")
        return 1
    except grpc.RpcError as err:
        say(f"kvstack backup: error: {describe(err)}")
        return 1
    except OSError as err:
        say(f"kvstack backup: error: {err}")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvstack.backup", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("take", help="copy the primary's data into FILE (and FILE.manifest.json)")
    p.add_argument("--backend", required=True, help="HOST:PORT of the backends (any of them)")
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--shown-as", default="", help="the file's name in messages")
    p = sub.add_parser("restore", help="check FILE, then restore it onto the primary")
    p.add_argument("--backend", required=True, help="HOST:PORT of the backends (any of them)")
    p.add_argument("file", type=Path)
    p.add_argument("--force", action="store_true", help="replace the data the primary holds")
    p.add_argument("--shown-as", default="", help="the file's name in messages")
    p = sub.add_parser("check", help="check FILE and its manifest; print the manifest")
    p.add_argument("file", type=Path)
    args = parser.parse_args(argv)
    if args.command == "take":
        return run(lambda: take(args.backend, args.output, args.shown_as))
    if args.command == "restore":
        return run(lambda: restore(args.backend, args.file, args.force, args.shown_as))
    return run(lambda: print(check_file(args.file).to_json(), end=""))


if __name__ == "__main__":
    sys.exit(main())
