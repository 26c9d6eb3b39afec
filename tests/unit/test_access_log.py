"""The access log through the services' own runtime (kvstack.runtime.Lifecycle) over real gRPC on
loopback, with real logging to the JSON formatter: at INFO only errors, slow calls and the
periodic summary are written; at DEBUG every call is."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc import aio

from kvstack import runtime
from kvstack.dev.processes import free_port

SERVICE = "kvstack.test.Probe"
SLOW_CALL = 0.25  # the threshold of the test that makes a slow call
SLOW_SLEEP = 0.6  # how long the slow handler takes: past that threshold whatever the machine
NEVER_SLOW = 60.0  # the threshold of the others: however busy the machine, no call is slow


async def _fast(request: bytes, context: aio.ServicerContext[Any, Any]) -> bytes:
    return request


async def _slow(request: bytes, context: aio.ServicerContext[Any, Any]) -> bytes:
    await asyncio.sleep(SLOW_SLEEP)
    return request


async def _fail(request: bytes, context: aio.ServicerContext[Any, Any]) -> bytes:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no")


class Probe:
    """A service with a fast, a slow and a failing method, for the runtime to serve."""

    name = "probe"

    def register(self, server: aio.Server) -> list[str]:
        handlers: dict[str, Any] = {
            name: grpc.unary_unary_rpc_method_handler(behaviour)
            for name, behaviour in (("Fast", _fast), ("Slow", _slow), ("Fail", _fail))
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        return [SERVICE]

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    yield
    logging.getLogger().handlers.clear()
    logging.getLogger().setLevel(logging.WARNING)


def _lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def _responses(out: str) -> dict[str, dict[str, Any]]:
    """The access lines by method."""
    return {r["method"]: r for r in _lines(out) if r["message"] == "response"}


async def _serve(
    level: str, slow_call: float, summary: float, calls: list[str], wait_for: str = ""
) -> None:
    """Serve Probe through the runtime at `level`, make `calls` (method names) one after
    another, wait (bounded) until a line with message `wait_for` was logged, and stop."""
    runtime.configure_logging("unit", level)
    config = runtime.RuntimeConfig(
        port=free_port(), host="127.0.0.1", slow_call=slow_call, log_summary=summary
    )
    lifecycle = runtime.Lifecycle(Probe(), config)
    seen = asyncio.Event()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage() == wait_for:
                seen.set()

    watch = Watch()
    logging.getLogger().addHandler(watch)
    serving = asyncio.create_task(lifecycle.run())
    try:
        async with aio.insecure_channel(f"127.0.0.1:{lifecycle.port}") as channel:
            await channel.channel_ready()
            for method in calls:
                call: Any = channel.unary_unary(f"/{SERVICE}/{method}")
                if method == "Fail":
                    with pytest.raises(aio.AioRpcError, match="INVALID_ARGUMENT"):
                        await call(b"x", timeout=10)
                else:
                    await call(b"x", timeout=10)
        seen.clear()  # a line logged from here on covers every call made
        if wait_for:
            async with asyncio.timeout(10):
                await seen.wait()
    finally:
        logging.getLogger().removeHandler(watch)
        lifecycle.stopping.set()
        await serving


def test_at_info_an_error_is_logged_and_a_call_that_succeeds_is_not(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """At the default level a failed call writes its access line at INFO, naming the method,
    the status and the time; a successful call that is not slow writes none."""
    asyncio.run(_serve("INFO", NEVER_SLOW, 0, ["Fast", "Fail", "Slow"]))
    lines = _responses(capsys.readouterr().out)
    assert set(lines) == {"Fail"}
    assert (lines["Fail"]["severity"], lines["Fail"]["code"]) == ("INFO", "INVALID_ARGUMENT")
    assert lines["Fail"]["slow"] is False
    assert lines["Fail"]["ms"] >= 0


def test_at_info_a_slow_call_is_logged(capsys: pytest.CaptureFixture[str]) -> None:
    """A call that takes KVSTACK_SLOW_CALL or more writes its line at INFO, marked slow."""
    asyncio.run(_serve("INFO", SLOW_CALL, 0, ["Slow"]))
    lines = _responses(capsys.readouterr().out)
    assert set(lines) == {"Slow"}
    assert (lines["Slow"]["severity"], lines["Slow"]["code"]) == ("INFO", "OK")
    assert lines["Slow"]["slow"] is True
    assert lines["Slow"]["ms"] >= SLOW_SLEEP * 1000


def test_at_debug_every_call_is_logged(capsys: pytest.CaptureFixture[str]) -> None:
    """At DEBUG the quick successful call writes its line too, at DEBUG."""
    asyncio.run(_serve("DEBUG", NEVER_SLOW, 0, ["Fast", "Fail"]))
    lines = _responses(capsys.readouterr().out)
    assert set(lines) == {"Fast", "Fail"}
    assert (lines["Fast"]["severity"], lines["Fast"]["code"]) == ("DEBUG", "OK")
    assert lines["Fast"]["slow"] is False
    assert lines["Fail"]["severity"] == "INFO"


def test_the_summary_counts_every_call_at_info(capsys: pytest.CaptureFixture[str]) -> None:
    """The periodic summary line (INFO) counts the calls per method, quick ones included, with
    their errors and a p99 bound, so that the calls not logged one by one are still seen."""
    asyncio.run(_serve("INFO", NEVER_SLOW, 0.2, ["Fast", "Fast", "Fast", "Fail"], "calls"))
    summaries = [r for r in _lines(capsys.readouterr().out) if r["message"] == "calls"]
    methods: dict[str, dict[str, Any]] = {}
    for line in summaries:  # the calls may straddle two summaries
        assert line["severity"] == "INFO"
        for method, counts in line["methods"].items():
            total = methods.setdefault(method, {"calls": 0, "errors": 0})
            total["calls"] += counts["calls"]
            total["errors"] += counts["errors"]
            assert counts["p99_ms_at_most"] > 0
    assert methods == {"Fast": {"calls": 3, "errors": 0}, "Fail": {"calls": 1, "errors": 1}}


def test_a_bucket_quantile_is_the_bound_of_its_bucket() -> None:
    """p99 of cumulative buckets is the upper bound of the first bucket holding 99% of them."""
    buckets = {0.001: 90.0, 0.01: 99.0, 0.1: 100.0, float("inf"): 100.0}
    assert runtime.bucket_quantile(buckets, 0.99) == 0.01
    assert runtime.bucket_quantile(buckets, 0.5) == 0.001
    assert runtime.bucket_quantile({0.1: 0.0}, 0.99) is None
