"""Which failures the client sends again: a real gRPC server on loopback that fails on purpose."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from kvstack.client import Client, Unreachable
from kvstack.v1 import kv_pb2, kv_pb2_grpc


class Failing(kv_pb2_grpc.KeyValueServicer):
    """Answers Get with each code of `codes` in turn, then with the value."""

    def __init__(self) -> None:
        self.codes: list[grpc.StatusCode] = []
        self.calls = 0

    def Get(self, request: kv_pb2.GetRequest, context: grpc.ServicerContext) -> kv_pb2.GetResponse:
        self.calls += 1
        if self.codes:
            context.abort(self.codes.pop(0), "failing on purpose")
        return kv_pb2.GetResponse(value=b"v")


@pytest.fixture
def failing() -> Iterator[tuple[Failing, str]]:
    servicer = Failing()  # type: ignore[abstract]  # only Get is served
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    kv_pb2_grpc.add_KeyValueServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(None)


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED])
def test_unavailable_and_cancelled_are_sent_again(
    failing: tuple[Failing, str], code: grpc.StatusCode
) -> None:
    """UNAVAILABLE, and CANCELLED (which gRPC gives a call pending on a server that shuts down,
    grpc/grpc#41785; the client cancels nothing itself), are retried within the budget."""
    servicer, target = failing
    servicer.codes = [code, code]
    client = Client(target, verbose=False, backoff=0.01)
    assert client.get(b"k") == b"v"
    assert (servicer.calls, client.retries) == (3, 2)


def test_other_failures_are_not_sent_again_and_a_spent_budget_says_so(
    failing: tuple[Failing, str],
) -> None:
    """NOT_FOUND or INVALID_ARGUMENT is the answer, raised at once; a call still failing after
    every attempt raises Unreachable, naming the server and what to do."""
    servicer, target = failing
    client = Client(target, verbose=False, backoff=0.01, attempts=3)
    servicer.codes = [grpc.StatusCode.INVALID_ARGUMENT]
    with pytest.raises(grpc.RpcError) as raised:
        client.get(b"k")
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert servicer.calls == 1
    servicer.codes = [grpc.StatusCode.CANCELLED] * 3
    with pytest.raises(Unreachable, match=f"cannot reach the kvstack server at {target}"):
        client.get(b"k")
    assert servicer.calls == 4
