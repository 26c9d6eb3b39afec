"""Which failures the client sends again: a real gRPC server on loopback that fails on purpose."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from kvstack.client import Client, Unreachable
from kvstack.v1 import kv_pb2, kv_pb2_grpc


class Failing(kv_pb2_grpc.KeyValueServicer):
    """Answers Get with each code of `codes` in turn, then the value; with `hold`, each failure
    comes as late as the kvstack server's would (0.2 s before the caller's deadline)."""

    def __init__(self) -> None:
        self.codes: list[grpc.StatusCode] = []
        self.calls = 0
        self.hold = False

    def Get(self, request: kv_pb2.GetRequest, context: grpc.ServicerContext) -> kv_pb2.GetResponse:
        self.calls += 1
        if self.codes:
            if self.hold:
                time.sleep(max(0.0, (context.time_remaining() or 0.0) - 0.2))
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
    with pytest.raises(Unreachable, match=f"server at {target} did not complete the call"):
        client.get(b"k")
    assert servicer.calls == 4


def test_the_timeout_bounds_every_attempt_together(failing: tuple[Failing, str]) -> None:
    """A server that holds each call until just before its deadline and then answers
    UNAVAILABLE (as ours does while it waits for a backend) is not retried past the call's 2 s:
    the caller hears in about 2 s, not attempts x timeout, with the server's own words."""
    servicer, target = failing
    servicer.codes, servicer.hold = [grpc.StatusCode.UNAVAILABLE] * 5, True
    client = Client(target, verbose=False, backoff=0.01, attempts=5)
    started = time.monotonic()
    with pytest.raises(Unreachable, match="UNAVAILABLE: failing on purpose") as raised:
        client.call(client.stub.Get, kv_pb2.GetRequest(key=b"k"), timeout=2)
    assert time.monotonic() - started < 2.5
    assert servicer.calls >= 2  # it did retry once the server answered, with what was left
    assert "did not complete the call in" in str(raised.value)
