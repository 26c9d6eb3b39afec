"""What every long-running kvstack service shares: configuration from the environment, JSON logs,
the gRPC health service, reflection, Prometheus metrics and graceful shutdown.

A service supplies a `ServiceImpl` (its servicers, a start-up step that decides when it can really
serve, and a clean-up step) and calls `run(service, config)`. Nothing here is copied into the
services: a fix here is a fix for all of them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import logging
import math
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from prometheus_client import Counter, Histogram, start_http_server

from kvstack import defaults

log = logging.getLogger("kvstack.runtime")

# ---------------------------------------------------------------------------------------------
# Configuration: each setting is a dataclass field carrying its environment variable and help.


def setting(env: str, default: Any, doc: str) -> Any:
    """Declare a configuration field read from the environment variable `env`."""
    return field(default=default, metadata={"env": env, "doc": doc})


C = TypeVar("C")

_SIZE = re.compile(r"(\d+)\s*(|k|ki|kib|m|mi|mib|g|gi|gib|t|ti|tib)b?", re.IGNORECASE)
_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}


def parse_size(text: str) -> int:
    """Parse a byte size such as 1048576, 512KiB, 64MiB or 1GiB (powers of 1024)."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a size; write bytes or use KiB, MiB, GiB (e.g. 1GiB)")
    return int(match[1]) << _SHIFT[match[2][:1].lower()]


_BOOLEANS = {
    "1": True,
    "true": True,
    "yes": True,
    "on": True,
    "0": False,
    "false": False,
    "no": False,
    "off": False,
}


def _convert(raw: str, default: Any, env: str) -> Any:
    if isinstance(default, bool):
        if raw.lower() not in _BOOLEANS:
            raise ConfigError(f"{env}={raw!r} is invalid: use true or false")
        return _BOOLEANS[raw.lower()]
    try:
        if isinstance(default, int):
            return parse_size(raw) if env.endswith(("_BYTES", "_SIZE")) else int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError as err:
        raise ConfigError(f"{env}={raw!r} is invalid: {err}") from None
    return raw


class ConfigError(Exception):
    """A setting that cannot be used; the message names the variable and what to set."""


def load(cls: type[C], environ: Mapping[str, str] | None = None, **overrides: Any) -> C:
    """Build the config dataclass `cls` from the environment (defaults where unset)."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        name = f.metadata.get("env")
        if f.name in overrides:
            values[f.name] = overrides[f.name]
        elif name and name in env:
            values[f.name] = _convert(env[name], f.default, name)
    return cls(**values)


def settings_of(cls: type[Any]) -> list[tuple[str, Any, str]]:
    """(variable, default, help) for every setting of a config class: the documented surface."""
    if not dataclasses.is_dataclass(cls):
        return []
    return [
        (f.metadata["env"], f.default, f.metadata["doc"])
        for f in dataclasses.fields(cls)
        if "env" in f.metadata
    ]


@dataclass(frozen=True)
class RuntimeConfig:
    """Settings every long-running service has. `port` defaults to the service's own
    (kvstack.defaults.PORTS)."""

    port: int = setting(
        "KVSTACK_PORT", 0, "gRPC port (default: the service's own, in kvstack.defaults.PORTS)"
    )
    host: str = setting(
        "KVSTACK_HOST",
        "localhost",
        "address the gRPC and metrics servers bind to: loopback by default, so a service run "
        "by hand is not on the network; the images set [::] (a container serves its own "
        "interfaces)",
    )
    metrics_port: int = setting(
        "KVSTACK_METRICS_PORT",
        defaults.METRICS_PORT,
        "Prometheus /metrics HTTP port; 0 turns metrics off",
    )
    shutdown_grace: float = setting(
        "KVSTACK_SHUTDOWN_GRACE",
        float(defaults.DRAIN_SECONDS),
        "seconds to finish in-flight calls after SIGTERM",
    )
    shutdown_delay: float = setting(
        "KVSTACK_SHUTDOWN_DELAY",
        0.0,
        "seconds to keep serving while reporting NOT_SERVING after SIGTERM, so load "
        "balancers stop sending first (Kubernetes' preStop pause does this job there)",
    )
    log_level: str = setting(
        "KVSTACK_LOG_LEVEL",
        "INFO",
        "DEBUG, INFO, WARNING or ERROR. At INFO a call that succeeds quickly writes no line of "
        "its own (DEBUG does: one per call); errors, slow calls and the periodic summary do",
    )
    slow_call: float = setting(
        "KVSTACK_SLOW_CALL",
        0.25,
        "seconds after which a call is slow: its access line is written at INFO (a quicker "
        "one that succeeds only at DEBUG); 0 logs every call at INFO",
    )
    log_summary: float = setting(
        "KVSTACK_LOG_SUMMARY",
        10.0,
        "seconds between the access log's summary lines at INFO (calls, errors and p99 per "
        "method since the last one; none when there were no calls); 0 turns them off",
    )
    max_receive_bytes: int = setting(
        "KVSTACK_MAX_RECEIVE_BYTES",
        4 << 20,
        "largest gRPC message accepted; larger ones get RESOURCE_EXHAUSTED",
    )
    max_connection_age: float = setting(
        "KVSTACK_MAX_CONNECTION_AGE",
        30.0,
        "seconds before a client connection is closed "
        "gracefully, so clients re-balance after a scale-out (not on the backend, whose callers "
        "find every backend through DNS; 0 turns it off)",
    )


# ---------------------------------------------------------------------------------------------
# Logging: one JSON object per line on stdout.
#
# The keys are the ones Google Cloud Logging's agent reads from a JSON line on GKE ("Special JSON
# fields in messages", https://cloud.google.com/logging/docs/structured-logging): `severity` (a
# LogSeverity name: DEBUG, INFO, WARNING, ERROR, CRITICAL), `message` (the entry's summary line)
# and `time` (RFC 3339 with a UTC offset). Every other key lands in jsonPayload as it is.
# Anywhere else (`docker service logs`, a terminal) the same line stays readable.

# Python's level numbers to Cloud Logging's LogSeverity names, highest first.
SEVERITIES = ((logging.CRITICAL, "CRITICAL"), (logging.ERROR, "ERROR"),
              (logging.WARNING, "WARNING"), (logging.INFO, "INFO"))  # fmt: skip
# The keys the formatter owns: a structured field of the same name cannot replace them.
RESERVED_KEYS = frozenset({"time", "severity", "message", "service", "logger"})


def severity(levelno: int) -> str:
    """Cloud Logging's LogSeverity for a Python level (custom levels round down)."""
    return next((name for number, name in SEVERITIES if levelno >= number), "DEBUG")


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        entry: dict[str, Any] = {
            "time": when.isoformat(timespec="milliseconds"),  # 2026-12-01T19:50:00.123+00:00
            "severity": severity(record.levelno),
            "service": self.service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                # Kept, under another name, rather than overwrite (or drop) what Cloud reads.
                entry[f"field_{key}" if key in RESERVED_KEYS else key] = value
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(service: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    try:
        root.setLevel(level.upper())
    except ValueError:
        raise ConfigError(
            f"KVSTACK_LOG_LEVEL={level!r} is invalid: use DEBUG, INFO, WARNING or ERROR"
        ) from None


def fields(**values: Any) -> dict[str, Any]:
    """`extra=` for a structured log line: log.info("saved", extra=fields(key=...))."""
    return {"fields": values}


def printable(data: bytes) -> str:
    """Bytes as text for logs and messages: UTF-8 where it is, escapes where it is not."""
    return data.decode("utf-8", "backslashreplace")


# ---------------------------------------------------------------------------------------------
# Metrics: the usual grpc_server_* families, by service, method and status code.

HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed, by method and status code",
    ["grpc_service", "grpc_method", "grpc_code"],
)
LATENCY = Histogram(
    "grpc_server_handling_seconds",
    "RPC latency, by method",
    ["grpc_service", "grpc_method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)

Behaviour = Callable[[Any, aio.ServicerContext[Any, Any]], Any]
ACCESS_LOG = logging.getLogger("kvstack.access")


def bucket_quantile(buckets: Mapping[float, float], q: float) -> float | None:
    """The upper bound of the bucket holding quantile q of a histogram given as cumulative
    counts by upper bound (as Prometheus' histogram_quantile, without interpolation), or None
    when it holds no observations."""
    ordered = sorted(buckets.items())
    total = ordered[-1][1] if ordered else 0.0
    if total <= 0:
        return None
    return next(bound for bound, count in ordered if count >= q * total)


class CallSummary:
    """The access log's summary: per method, the calls, errors and p99 since the last line,
    read from the same counters and histogram that /metrics serves (HANDLED, LATENCY)."""

    def __init__(self) -> None:
        self._last = self._read()
        self._at = time.monotonic()

    @staticmethod
    def _read() -> dict[str, tuple[float, float, dict[float, float]]]:
        """method -> (calls, errors, cumulative latency buckets by upper bound)."""
        calls: dict[str, list[float]] = {}
        for family in HANDLED.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    counts = calls.setdefault(sample.labels["grpc_method"], [0.0, 0.0])
                    counts[0] += sample.value
                    if sample.labels["grpc_code"] != "OK":
                        counts[1] += sample.value
        buckets: dict[str, dict[float, float]] = {}
        for family in LATENCY.collect():
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    by_bound = buckets.setdefault(sample.labels["grpc_method"], {})
                    bound = float(sample.labels["le"])
                    by_bound[bound] = by_bound.get(bound, 0.0) + sample.value
        return {m: (c[0], c[1], buckets.get(m, {})) for m, c in calls.items()}

    def line(self) -> dict[str, Any] | None:
        """The fields of the next summary line (None when no call completed since the last)."""
        now, at = self._read(), time.monotonic()
        methods: dict[str, dict[str, Any]] = {}
        for method, (calls, errors, buckets) in now.items():
            before = self._last.get(method, (0.0, 0.0, {}))
            if calls - before[0] <= 0:
                continue
            since = {b: n - before[2].get(b, 0.0) for b, n in buckets.items()}
            p99 = bucket_quantile(since, 0.99)
            methods[method] = {
                "calls": int(calls - before[0]),
                "errors": int(errors - before[1]),
                # None when the 99th percentile is past the last bucket (over 10 s)
                "p99_ms_at_most": None if p99 is None or math.isinf(p99) else p99 * 1000,
            }
        seconds = round(at - self._at, 1)
        self._last, self._at = now, at
        return {"seconds": seconds, "methods": methods} if methods else None

    async def run(self, interval: float) -> None:
        """Log a summary line at INFO every `interval` seconds, until cancelled."""
        while True:
            await asyncio.sleep(interval)
            summary = self.line()
            if summary and ACCESS_LOG.isEnabledFor(logging.INFO):
                ACCESS_LOG.info("calls", extra=fields(**summary))


class ObservingInterceptor(aio.ServerInterceptor):
    """Counts, times and logs every unary and server-streaming call of the service's own API.

    The access line of a call goes to the `kvstack.access` logger at INFO when the call failed
    (any status but OK) or took `slow_call` seconds or more, and at DEBUG otherwise: at the
    default level (INFO) a quick, successful call costs no log line; CallSummary counts it."""

    def __init__(self, access_log: bool = True, slow_call: float = RuntimeConfig.slow_call) -> None:
        self.access_log = access_log
        self.slow_call = slow_call
        self.log = ACCESS_LOG

    def _done(
        self,
        method: str,
        context: aio.ServicerContext[Any, Any],
        started: float,
        error: BaseException | None,
    ) -> None:
        code = context.code()
        if code is None:
            code = grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN
        if isinstance(code, int):  # aio contexts may report the raw integer
            code = next(c for c in grpc.StatusCode if c.value[0] == code)
        self.record(method, code, time.perf_counter() - started)

    def record(self, method: str, code: grpc.StatusCode, elapsed: float) -> None:
        """Count, time and log one call (`/package.Service/Method`): what the interceptor does
        for each call gRPC runs, for a call a service ran itself (an item of the backend's
        batch stream, which is itself left uncounted: it would be one call that never ends)."""
        service, _, name = method.lstrip("/").rpartition("/")
        HANDLED.labels(service, name, code.name).inc()
        LATENCY.labels(service, name).observe(elapsed)
        if not self.access_log:
            return
        slow = elapsed >= self.slow_call
        level = logging.INFO if slow or code is not grpc.StatusCode.OK else logging.DEBUG
        if self.log.isEnabledFor(level):
            self.log.log(
                level,
                "response",
                extra=fields(method=name, code=code.name, ms=round(elapsed * 1000, 3), slow=slow),
            )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        # Typed loosely: grpc's stubs describe sync handlers, these wrap aio ones.
        handler: Any = await continuation(details)
        method = details.method
        if handler is None or method.startswith(("/grpc.health", "/grpc.reflection")):
            return handler
        if handler.unary_unary is not None:
            inner_unary: Any = handler.unary_unary

            async def unary(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
                started, error = time.perf_counter(), None
                try:
                    return await inner_unary(request, context)
                except BaseException as err:
                    error = err
                    raise
                finally:
                    self._done(method, context, started, error)

            return grpc.unary_unary_rpc_method_handler(
                unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream is not None:
            inner_stream: Any = handler.unary_stream

            async def stream(
                request: Any, context: aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                started, error = time.perf_counter(), None
                try:
                    async for item in inner_stream(request, context):
                        yield item
                except BaseException as err:
                    error = err
                    raise
                finally:
                    self._done(method, context, started, error)

            return grpc.unary_stream_rpc_method_handler(
                stream, handler.request_deserializer, handler.response_serializer
            )
        return handler


# ---------------------------------------------------------------------------------------------
# The service lifecycle.


class ServiceImpl(Protocol):
    """What a service gives the runtime (not kvstack.ops.catalog.Service, its entry in the
    deploy's service list)."""

    name: str

    def register(self, server: aio.Server) -> list[str]:
        """Add the servicers to server; return their full gRPC service names."""

    async def start(self) -> None:
        """Get ready to serve (open storage, reach dependencies). Health says SERVING after."""

    async def stop(self) -> None:
        """Release resources once in-flight calls have finished."""

    # Optional: `recycle_connections = False` keeps KVSTACK_MAX_CONNECTION_AGE off this
    # service's connections (see server_options).
    # Optional: `async def drain(self, grace: float) -> None`, run while the server stops: end
    # long-lived calls (streams) once the short ones are done, so the drain need not wait out
    # its grace period.
    # Optional: `def bind_health(self, set_serving: Callable[[str, bool], None]) -> None`,
    # called once before start(); the service may then mark one of its gRPC service names
    # NOT_SERVING (and back) while the process as a whole ("") stays SERVING.
    # Optional: `def bind_observer(self, record: Callable[[str, grpc.StatusCode, float], None])
    # -> None`, called once before start(): `record` counts, times and logs a call the service
    # ran itself, not gRPC (ObservingInterceptor.record).


# Every channel between our processes (client -> server -> backend, replica -> primary):
# - reconnect within a second or two: gRPC's default backoff grows to 120 s, and a restarted
#   process often comes back on the same address (Swarm and Kubernetes reuse IPs), where a
#   channel still backing off from the dead one would not see it for minutes;
# - keepalive pings: a connection whose peer vanished without a reset (a killed node, a network
#   partition, an address that moved) is found dead within KEEPALIVE_MS + KEEPALIVE_TIMEOUT_MS,
#   not when TCP gives up (~15 min); until then every call on it would only time out.
# server_options() below accepts these pings (gRPC's default would answer "too_many_pings").
KEEPALIVE_MS = 10_000
KEEPALIVE_TIMEOUT_MS = 5_000
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", KEEPALIVE_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


def server_options(config: RuntimeConfig, recycle: bool = True) -> list[tuple[str, Any]]:
    """The gRPC server's options. `recycle` closes each connection after
    KVSTACK_MAX_CONNECTION_AGE, so clients of a service re-resolve and re-balance; a service
    whose callers find its instances themselves (the backend: the Directory polls DNS) passes
    False, so that no long-lived stream of its own (a replica's Stream) is ever cut by it."""
    age: list[tuple[str, Any]] = []
    if recycle and config.max_connection_age > 0:
        age = [
            ("grpc.max_connection_age_ms", int(config.max_connection_age * 1000)),
            ("grpc.max_connection_age_grace_ms", int(config.shutdown_grace * 1000)),
        ]
    return [
        # Our clients' keepalive (above), and the server's own: a peer that vanished (say a
        # replica's stream) is let go of within seconds.
        ("grpc.keepalive_time_ms", KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_MS // 2),
        ("grpc.http2.max_pings_without_data", 0),
        # Measured: with both ends pinging, gRPC's default of 2 "ping strikes" still closed an
        # idle connection with "too_many_pings" after ~30 s. Our peers are our own processes.
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.max_receive_message_length", config.max_receive_bytes),
        ("grpc.max_send_message_length", config.max_receive_bytes),
        *age,
        ("grpc.so_reuseport", 0),
    ]


class Lifecycle:
    """A running gRPC server with health that tells the truth; used by run() and by tests."""

    def __init__(
        self, service: ServiceImpl, config: RuntimeConfig, *, access_log: bool = True
    ) -> None:
        self.service = service
        self.config = config
        self.health = health_aio.HealthServicer()
        self.observer = ObservingInterceptor(access_log, config.slow_call)
        self.server = aio.server(
            interceptors=[self.observer],
            options=server_options(config, getattr(service, "recycle_connections", True)),
        )
        self.names = service.register(self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [
                *self.names,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            self.server,
        )
        port = config.port or defaults.PORTS.get(service.name, 0)
        self.port = self.server.add_insecure_port(f"{config.host}:{port}")
        if self.port == 0:
            raise ConfigError(
                f"cannot listen on {config.host}:{port}: is the port in use? "
                "Stop what uses it or set KVSTACK_PORT to a free port"
            )
        self.stopping = asyncio.Event()
        self.started = False
        # Per-name health a service set itself (e.g. a replica that is too far behind).
        self.overrides: dict[str, bool] = {}
        self._pending: set[asyncio.Task[None]] = set()
        bind = getattr(service, "bind_health", None)
        if bind is not None:
            bind(self.set_serving)
        bind = getattr(service, "bind_observer", None)
        if bind is not None:
            bind(self.observer.record)

    def set_serving(self, name: str, serving: bool) -> None:
        """Mark one of the service's gRPC services (un)able to serve, from start-up on."""
        self.overrides[name] = serving
        if self.started and not self.stopping.is_set():
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if serving
                else (health_pb2.HealthCheckResponse.NOT_SERVING)
            )
            task = asyncio.get_running_loop().create_task(self.health.set(name, status))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _set_all(
        self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType
    ) -> None:
        for name in ("", *self.names):
            await self.health.set(name, status)

    async def run(self) -> None:
        await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        log.info("listening", extra=fields(port=self.port, services=self.names))
        starting = asyncio.create_task(self.service.start())
        stop = asyncio.create_task(self.stopping.wait())
        await asyncio.wait({starting, stop}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()  # a failed start-up ends the process with its error
            self.started = True
            await self._set_all(health_pb2.HealthCheckResponse.SERVING)
            for name, serving in self.overrides.items():
                if not serving:
                    await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
            log.info("serving", extra=fields(port=self.port))
            summary = None
            if self.config.log_summary > 0:
                summary = asyncio.create_task(CallSummary().run(self.config.log_summary))
            await stop
            if summary is not None:
                summary.cancel()
        else:
            starting.cancel()
        await self.shutdown()

    async def shutdown(self) -> None:
        log.info("draining", extra=fields(grace_s=self.config.shutdown_grace))
        await self.health.enter_graceful_shutdown()
        if self.config.shutdown_delay > 0:
            await asyncio.sleep(self.config.shutdown_delay)
        started = time.monotonic()
        stopping = asyncio.create_task(self.server.stop(self.config.shutdown_grace))
        drain = getattr(self.service, "drain", None)
        if drain is not None:
            # New calls are refused from here; the service ends what would hold the drain open
            # although no call of its own is left (the backend's replication streams).
            await drain(self.config.shutdown_grace)
        await stopping
        await self.service.stop()
        log.info("stopped", extra=fields(drained_s=round(time.monotonic() - started, 2)))


def run(
    name: str,
    argv: list[str],
    build: Callable[[], ServiceImpl],
    settings: type[Any] | None = None,
) -> int:
    """Serve until SIGTERM or SIGINT, drain, and return the exit code (0 after a clean drain).

    A long-running service takes no arguments (`argv` must be empty): everything is
    configuration from the environment, so the same image runs unchanged everywhere.

    `build` makes the service from its own settings, inside the event loop (gRPC's aio channels
    belong to the loop that made them). A ConfigError or OSError at start-up ends the process
    with exit code 2 and one log line that names what to fix, not a traceback.
    """
    if argv in (["--help"], ["-h"]):
        print(f"usage: python -m kvstack {name}\n\nConfigured by environment variables:")
        for env, default, doc in settings_of(RuntimeConfig) + settings_of(settings or object):
            print(f"  {env} (default {default!r})\n      {doc}")
        return 0
    if argv:
        print(
            f"usage: the {name} takes no arguments ({' '.join(argv)}); configure it with KVSTACK_* "
            "variables (`--help` lists them, as does docs/configuration.md)",
            file=sys.stderr,
        )
        return 2
    try:
        config = load(RuntimeConfig)
        configure_logging(name, config.log_level)
    except ConfigError as err:
        configure_logging(name)
        log.error("cannot start: %s", err)  # noqa: TRY400 - the message is the whole story
        return 2

    async def main() -> None:
        lifecycle = Lifecycle(build(), config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lifecycle.stopping.set)
        await lifecycle.run()

    try:
        if config.metrics_port:
            start_http_server(config.metrics_port, addr=config.host.strip("[]"))
        asyncio.run(main())
    except (ConfigError, OSError) as err:
        log.error("cannot start: %s", err)  # noqa: TRY400
        return 2
    return 0
