"""A server of this release in front of backends of the release before the batch stream, as in
a rollback (`kvstack rollback` undoes the backends first) or a rollout half-way: the old backend
answers kvstack.v1.Batch/Stream UNIMPLEMENTED, and every call must still succeed, sent as a
unary KeyValue call.

The old backend is the real one, run from `git archive` of PREVIOUS_RELEASE (the last commit
before the batch stream) with this venv. What this cannot show: Kubernetes' order of replacing
pods; the reverse (a backend of this release replacing an old one at the same address while
the server runs) is shown by tests/unit/test_outbox_and_batcher.py."""

from __future__ import annotations

import asyncio
import io
import subprocess
import tarfile
from pathlib import Path

import grpc
import pytest
from grpc import aio

from kvstack.v1 import kv_pb2, kv_pb2_grpc
from tests.conftest import ROOT, Spawn

# The last commit of main before the batch stream was merged (c9532a6's first parent).
PREVIOUS_RELEASE = "a60ca69"


@pytest.fixture(scope="module")
def previous_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """src/ of PREVIOUS_RELEASE, to put first on a backend's PYTHONPATH."""
    if not (ROOT / ".git").exists():
        pytest.skip(
            "not a git checkout (a copy of the tree, as `kvstack dev` tests before a rollout): "
            "this test needs the repository's history, and runs in `make test` and CI"
        )
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", PREVIOUS_RELEASE, "src"],
        capture_output=True,
        check=False,
    )
    if archive.returncode != 0:
        pytest.fail(
            f"git archive {PREVIOUS_RELEASE} failed ({archive.stderr.decode().strip()}): this "
            "test needs the repository's history; in a shallow clone run `git fetch --unshallow`"
        )
    root = tmp_path_factory.mktemp("previous")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(root, filter="data")
    assert not (root / "src/kvstack/batching.py").exists(), "not a release before the stream"
    return root / "src"


def test_a_new_server_serves_every_call_through_a_backend_without_the_stream(
    spawn: Spawn, tmp_path: Path, previous_src: Path
) -> None:
    """Puts, Gets, Lists and Deletes, 40 of each at once, through a server of this release to
    a backend of the previous one: every call succeeds, and the server says once why it calls
    that backend one call at a time."""
    backend = spawn(
        "backend", {"KVSTACK_DATA_DIR": str(tmp_path / "data"), "PYTHONPATH": str(previous_src)}
    ).wait_serving()
    server = spawn("server", {"KVSTACK_BACKEND_TARGET": f"dns:///{backend.target}"})
    server.wait_serving()

    async def main() -> None:
        async with aio.insecure_channel(server.target) as channel:
            kv = kv_pb2_grpc.KeyValueStub(channel)
            keys = [f"old/{i:02d}".encode() for i in range(40)]
            puts = await asyncio.gather(
                *(kv.Put(kv_pb2.PutRequest(key=k, value=k[::-1]), timeout=10) for k in keys)
            )
            assert all(p.created for p in puts)
            gets = await asyncio.gather(
                *(kv.Get(kv_pb2.GetRequest(key=k), timeout=10) for k in keys)
            )
            assert [g.value for g in gets] == [k[::-1] for k in keys]
            page = await kv.List(kv_pb2.ListRequest(prefix=b"old/"), timeout=10)
            assert [e.key for e in page.entries] == keys
            await asyncio.gather(
                *(kv.Delete(kv_pb2.DeleteRequest(key=k), timeout=10) for k in keys)
            )
            with pytest.raises(aio.AioRpcError) as gone:
                await kv.Get(kv_pb2.GetRequest(key=keys[0]), timeout=10)
            assert gone.value.code() == grpc.StatusCode.NOT_FOUND

    asyncio.run(main())
    assert server.logs().count("backend has no batch stream") == 1
