"""`python -m kvstack.probe`: the image's own health check (Docker HEALTHCHECK, Swarm).

Asks the gRPC health service (`grpc.health.v1.Health/Check`) of the service in this container
and exits 0 only when it says SERVING. Kubernetes does not need it: it probes gRPC health natively.

It speaks the one call it needs over HTTP/2 itself, with the standard library only: importing
grpcio and the generated health code cost about 130 ms of CPU per check, where the whole check
now costs about 60 ms, Docker's exec included (docs/architecture.md, "What a health check costs").
Swarm runs a check of every task every few seconds, on a host that may be saturated, where each
millisecond of CPU a check needs becomes many of waiting. So: no import beyond the standard
library on the check's path (tests/unit/test_probe_imports.py keeps it so), and the same
answers as a grpcio client gives (tests/integration/test_probe.py compares the two).
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import sys
import time

from kvstack import defaults

PATH = b"/grpc.health.v1.Health/Check"
SERVING_STATUS = ("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")
# grpc.StatusCode names by number (https://grpc.github.io/grpc/core/md_doc_statuscodes.html).
CODES = (
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
)
# HTTP/2 (RFC 9113) frame types and flags this client uses.
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, CONTINUATION = 0, 1, 3, 4, 6, 7, 9
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
STATIC_TABLE_SIZE = 61  # RFC 7541 appendix A; no name this client looks for is in it


class ProtocolError(Exception):
    """The peer's bytes are not the HTTP/2 / gRPC this client expects."""


def default_port() -> int:
    if os.environ.get("KVSTACK_PORT"):
        return int(os.environ["KVSTACK_PORT"])
    return defaults.PORTS.get(os.environ.get("KVSTACK_SERVICE", "server"), 0)


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    head = struct.pack(">I", len(payload))[1:] + bytes((kind, flags)) + struct.pack(">I", stream)
    return head + payload


def _string(value: bytes) -> bytes:
    """An HPACK string literal, not Huffman-coded (short strings only: a 7-bit length)."""
    assert len(value) < 127
    return bytes((len(value),)) + value


def varint(value: int) -> bytes:
    """A protobuf base-128 varint (as a length-delimited field's length is written)."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def request(authority: str, service: str, timeout: float) -> bytes:
    """Everything the client sends, at once: preface, SETTINGS, the call's HEADERS and DATA."""
    headers = (
        b"\x83"  # :method POST (static index 3)
        b"\x86"  # :scheme http (static index 6)
        + b"\x04" + _string(PATH)  # :path, a literal with the static table's name (index 4)
        + b"\x01" + _string(authority.encode())  # :authority (index 1)
        + b"\x0f\x10" + _string(b"application/grpc")  # content-type (index 31)
        + b"\x00" + _string(b"te") + _string(b"trailers")
        + b"\x00" + _string(b"grpc-timeout") + _string(f"{max(1, int(timeout * 1000))}m".encode())
    )  # fmt: skip
    name = service.encode()
    message = (b"\x0a" + varint(len(name)) + name) if name else b""  # HealthCheckRequest
    body = b"\x00" + struct.pack(">I", len(message)) + message
    return (
        PREFACE
        + frame(SETTINGS, 0, 0)
        + frame(HEADERS, END_HEADERS, 1, headers)
        + frame(DATA, END_STREAM, 1, body)
    )


def _integer(block: bytes, pos: int, prefix: int) -> tuple[int, int]:
    """An HPACK integer with an N-bit prefix starting at block[pos] (RFC 7541, 5.1)."""
    limit = (1 << prefix) - 1
    value = block[pos] & limit
    pos += 1
    if value < limit:
        return value, pos
    shift = 0
    while True:
        byte = block[pos]
        pos += 1
        value += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _literal(block: bytes, pos: int) -> tuple[bytes | None, int]:
    """An HPACK string; None when Huffman-coded (this client needs no such value)."""
    huffman = block[pos] & 0x80
    length, pos = _integer(block, pos, 7)
    value = block[pos : pos + length]
    return (None if huffman else value), pos + length


def decode_headers(block: bytes, table: list[tuple[bytes, bytes | None]]) -> dict[bytes, bytes]:
    """The header fields of one HPACK block whose names and values are plain literals or index
    the dynamic table (which `table` keeps, newest first, across the connection's blocks)."""
    fields: dict[bytes, bytes] = {}

    def entry(index: int) -> tuple[bytes, bytes | None]:
        if index <= STATIC_TABLE_SIZE:
            return b"", None
        if index - STATIC_TABLE_SIZE > len(table):
            raise ProtocolError(f"HPACK index {index} beyond the dynamic table")
        return table[index - STATIC_TABLE_SIZE - 1]

    pos = 0
    while pos < len(block):
        first = block[pos]
        if first & 0x80:  # indexed field
            index, pos = _integer(block, pos, 7)
            name, value = entry(index)
        elif first & 0xE0 == 0x20:  # dynamic table size update
            _, pos = _integer(block, pos, 5)
            continue
        else:  # a literal: with incremental indexing (01), without (0000) or never (0001)
            indexing = first & 0xC0 == 0x40
            index, pos = _integer(block, pos, 6 if indexing else 4)
            if index:
                name = entry(index)[0]
            else:
                raw, pos = _literal(block, pos)
                name = raw or b""
            value, pos = _literal(block, pos)
            if indexing:
                table.insert(0, (name, value))
        if name and value is not None:
            fields[name] = value
    return fields


def call(host: str, port: int, service: str, timeout: float) -> str:
    """One health Check: the serving status name, or the gRPC code name when the call failed."""
    deadline = time.monotonic() + timeout
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(request(f"{host}:{port}", service, timeout))
        buffer = b""
        message = b""
        header_block = b""
        table: list[tuple[bytes, bytes | None]] = []
        trailers: dict[bytes, bytes] = {}
        stream_ends = False

        def read(count: int) -> bytes:
            nonlocal buffer
            while len(buffer) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                sock.settimeout(left)
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionResetError("the peer closed the connection")
                buffer += chunk
            out, buffer = buffer[:count], buffer[count:]
            return out

        while True:
            head = read(9)
            length = int.from_bytes(head[:3], "big")
            kind, flags = head[3], head[4]
            stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
            payload = read(length)
            if kind == SETTINGS and not flags & ACK:
                sock.sendall(frame(SETTINGS, ACK, 0))
            elif kind == PING and not flags & ACK:
                sock.sendall(frame(PING, ACK, 0, payload))
            elif kind == GOAWAY or (kind == RST_STREAM and stream == 1):
                return "UNAVAILABLE"
            elif stream != 1:
                continue  # WINDOW_UPDATE, PRIORITY, ...: nothing this one call needs
            elif kind == DATA:
                if flags & PADDED:
                    payload = payload[1 : len(payload) - payload[0]]
                message += payload
            elif kind in (HEADERS, CONTINUATION):
                if kind == HEADERS:
                    if flags & PADDED:
                        payload = payload[1 : len(payload) - payload[0]]
                    if flags & PRIORITY:
                        payload = payload[5:]
                    stream_ends = bool(flags & END_STREAM)
                header_block += payload
                if flags & END_HEADERS:
                    trailers = decode_headers(header_block, table)
                    header_block = b""
                    if stream_ends:
                        break
            if kind == DATA and flags & END_STREAM:
                break
    code = trailers.get(b"grpc-status")
    if code is None or not code.isdigit() or int(code) >= len(CODES):
        raise ProtocolError(f"the call ended without a readable grpc-status: {trailers}")
    if int(code) != 0:
        return CODES[int(code)]
    if len(message) < 5:
        raise ProtocolError("the call succeeded without an answer message")
    body = message[5 : 5 + int.from_bytes(message[1:5], "big")]
    status = 0  # HealthCheckResponse: field 1, a varint enum; absent means 0 (UNKNOWN)
    if body[:1] == b"\x08":
        shift = 0
        for byte in body[1:]:
            status |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
    return SERVING_STATUS[status] if status < len(SERVING_STATUS) else f"status {status}"


def check(target: str, timeout: float, service: str = "") -> str:
    """The serving status name, or the gRPC error code name when the check itself failed."""
    host, _, port = target.rpartition(":")
    host = host.strip("[]")
    try:
        return call(host, int(port), service, timeout)
    except TimeoutError:
        return "DEADLINE_EXCEEDED"
    except OSError:  # refused, reset, a name that does not resolve, no route
        return "UNAVAILABLE"
    except (ProtocolError, IndexError, ValueError):
        return "UNKNOWN"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvstack.probe", description=__doc__)
    parser.add_argument(
        "--target", default=None, help="host:port (default: this container's service on localhost)"
    )
    parser.add_argument("--timeout", type=float, default=2.0)
    parser.add_argument(
        "--service",
        default="",
        help='the health name to ask (default "": the process as a whole; a service may say '
        "NOT_SERVING for one of its APIs, e.g. a backend replica for kvstack.v1.KeyValue)",
    )
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    target = args.target or f"localhost:{default_port()}"
    status = check(target, args.timeout, args.service)
    if not args.quiet:
        print(f"{target}{' ' + args.service if args.service else ''}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
