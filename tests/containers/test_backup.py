"""`kvstack backup local` and `kvstack restore local` for real: the data survives the loss of
every volume.

One stack for the module (kvtest-bk-XXXXXX, removed with its volumes afterwards). A writer (the
client's `load`: unique keys, values unique to the run, one JSON line per acknowledged write)
runs while the backup is taken through the CLI verb. The writes acknowledged before the backup
began are in it (it is taken after them, in one read transaction). Then `down --volumes`, up
again (empty), restore: after catch-up every backend holds exactly the backup's keys with their
values, as many as its manifest says. Over live data the restore is refused without --force
(nothing changed), and a truncated file, a flipped byte and a file that is not a backup are each
refused saying what is wrong; with --force the keys written since are gone from every backend.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import lmdb
import pytest

from kvstack import backup, cli
from kvstack.dev.rollouts import json_logs
from kvstack.ops import catalog, local
from kvstack.ops.shell import Runner

from .conftest import StackUnderTest, docker
from .test_replication_faults import PRIMARY_SLOT, listings, wait_backends

pytestmark = pytest.mark.containers

RUNNER = Runner()
BACKEND = catalog.get("backend")
CONVERGE_S = 90


@pytest.fixture(scope="module")
def bstack(tag: str) -> Iterator[StackUnderTest]:
    stack = StackUnderTest(f"kvtest-bk-{uuid.uuid4().hex[:6]}", tag)
    try:
        local.deploy(RUNNER, stack.name, tag)
        stack.wait_healthy(timeout=180)
        wait_backends(stack, 2)
        yield stack
    finally:
        local.remove(RUNNER, stack.name, volumes=True)
        (local.BUILD_DIR / f"{stack.name}.stack.json").unlink(missing_ok=True)


def kvstack(*args: str) -> int:
    return cli.main(list(args))


def file_entries(path: Path, prefix: str = "") -> dict[str, str]:
    env = lmdb.open(str(path), subdir=False, readonly=True, lock=False, max_dbs=8)
    with env.begin() as txn:
        kv = env.open_db(b"kv", txn=txn, create=False)
        held = {bytes(k).decode(): bytes(v).decode() for k, v in txn.cursor(db=kv)}
    env.close()
    return {k: v for k, v in held.items() if k.startswith(prefix)}


def acked(container: str) -> dict[str, str]:
    return {str(r["key"]): str(r["value"]) for r in json_logs(container) if r.get("ack")}


def every_backend_holds(stack: StackUnderTest, prefix: str, expected: dict[str, str]) -> None:
    deadline = time.monotonic() + CONVERGE_S
    while True:
        held = listings(stack, prefix, wait_backends(stack, 2))
        if all(h == expected for h in held.values()):
            return
        if time.monotonic() > deadline:
            summary = {s: (len(h), h.get("__error__", "")) for s, h in held.items()}
            pytest.fail(f"backends (slot: entries, error) after {CONVERGE_S} s: {summary}; "
                        f"expected {len(expected)}")  # fmt: skip
        time.sleep(2)


def test_backup_during_writes_then_lose_every_volume_and_restore(
    bstack: StackUnderTest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("KVSTACK_STACK", bstack.name)
    prefix = f"bk/{uuid.uuid4().hex[:6]}/"
    writer = docker(*bstack.job_argv("client", "load", "--count", "20000", "--concurrency", "4",
                                     "--prefix", prefix, detach=True)).strip()  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while len(acked(writer)) < 400:
            assert time.monotonic() < deadline, "the writer did not get going"
            time.sleep(0.5)
        before = acked(writer)
        out = tmp_path / "stack.mdb"
        assert kvstack("backup", "local", "--output", str(out)) == 0
        time.sleep(1)
        assert docker("inspect", "--format", "{{.State.Running}}", writer).strip() == "true"
        assert len(acked(writer)) > len(before), "writes must go on during the backup"
    finally:
        docker("rm", "-f", writer, check=False)
    err = capfd.readouterr().err
    assert "backup: done" in err
    manifest = backup.check_file(out)
    in_backup = file_entries(out, prefix)
    missing = {k: v for k, v in before.items() if in_backup.get(k) != v}
    assert not missing, f"{len(missing)} writes acknowledged before the backup are not in it"
    assert len(file_entries(out)) == manifest.keys

    # Every volume lost; the stack comes back empty and takes the restore without --force.
    local.remove(RUNNER, bstack.name, volumes=True)
    local.deploy(RUNNER, bstack.name, bstack.tag)
    bstack.wait_healthy(timeout=180)
    wait_backends(bstack, 2)
    assert kvstack("restore", "local", str(out)) == 0
    assert "restore: done" in capfd.readouterr().err
    every_backend_holds(bstack, prefix, in_backup)
    primary = listings(bstack, "", wait_backends(bstack, 2))[PRIMARY_SLOT]
    assert len(primary) == manifest.keys

    # Over live data: refused without --force, nothing changed.
    assert bstack.run_job("client", "put", f"{prefix}zz-after", "new").returncode == 0
    after = {**in_backup, f"{prefix}zz-after": "new"}
    every_backend_holds(bstack, prefix, after)
    assert kvstack("restore", "local", str(out)) == 1
    said = capfd.readouterr().err
    assert f"holds {manifest.keys + 1} keys" in said
    assert f"replace {manifest.keys} of them" in said
    assert "lose 1" in said
    assert "--force" in said

    # Bad files: each refused saying what is wrong, before anything is sent.
    data = out.read_bytes()
    bad = {"truncated": data[: len(data) // 2], "corrupted: its SHA-256": None}
    for what, content in bad.items():
        copy = tmp_path / f"{what[:9]}.mdb"
        if content is None:
            flipped = bytearray(data)
            flipped[len(data) // 2] ^= 0x01
            content = bytes(flipped)
        copy.write_bytes(content)
        backup.manifest_path(copy).write_bytes(backup.manifest_path(out).read_bytes())
        assert kvstack("restore", "local", str(copy), "--force") == 1
        assert what in capfd.readouterr().err
    stranger = tmp_path / "stranger.mdb"
    stranger.write_bytes(os.urandom(8192))
    assert kvstack("restore", "local", str(stranger), "--force") == 1
    assert "not a kvstack backup" in capfd.readouterr().err
    every_backend_holds(bstack, prefix, after)

    # With --force the key written since is gone from every backend.
    assert kvstack("restore", "local", str(out), "--force") == 0
    assert f"{manifest.keys} replaced, 1 lost" in capfd.readouterr().err
    every_backend_holds(bstack, prefix, in_backup)
