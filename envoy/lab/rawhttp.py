"""Requests no SDK sends: raw HTTP/1.1 bytes, and cleartext HTTP/2 (h2c).

The SDKs and httpx only produce well-behaved requests. The hostile inputs a
filter must survive (DESIGN.md) need the wire itself:

- :func:`http1` writes the bytes it is given (header values that are not
  UTF-8, a chunked body, two identity headers...) and parses the answer with
  the standard library's ``http.client``, which raises on a response that is
  not well-formed HTTP;
- :func:`h2c` speaks HTTP/2 with prior knowledge (what Envoy's ``codec_type:
  AUTO`` accepts on a cleartext listener) through the ``h2`` state machine,
  and can end a request with trailers: HEADERS, DATA without END_STREAM,
  then trailing HEADERS with END_STREAM, as gRPC-style clients do.

Every socket has a timeout and every read loop a deadline.
"""

from __future__ import annotations

import gzip
import http.client
import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import h2.config
import h2.connection
import h2.events


@dataclass
class RawResponse:
    """A response read off the wire: status, headers (lower-case names), body."""

    status: int
    headers: dict[str, str]
    body: bytes
    trailers: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        body = self.body
        if self.headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        return json.loads(body)


def _connect(address: str, timeout: float) -> socket.socket:
    host, port = address.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=timeout)


def http1(address: str, request: bytes, timeout: float = 10.0) -> RawResponse:
    """Sends ``request`` (complete HTTP/1.1 bytes) on a new connection.

    The response is parsed by ``http.client`` (content-length or chunked);
    a malformed response raises ``http.client.HTTPException``.
    """
    with _connect(address, timeout) as sock:
        sock.sendall(request)
        response = http.client.HTTPResponse(sock, method=_method(request))
        try:
            response.begin()
            body = response.read()
            # http.client folds repeated headers; a dict of the last is enough here.
            headers = {k.lower(): v for k, v in response.getheaders()}
            return RawResponse(response.status, headers, body)
        finally:
            response.close()


def _method(request: bytes) -> str:
    return request.split(b" ", 1)[0].decode("ascii", "replace")


def request_bytes(method: str, path: str, headers: Iterable[tuple[bytes | str, bytes | str]],
                  body: bytes = b"", *, chunked: bool = False,
                  chunk_size: int = 64 * 1024) -> bytes:
    """HTTP/1.1 request bytes; header values are written as given (bytes or latin-1)."""
    def raw(v: bytes | str) -> bytes:
        return v if isinstance(v, bytes) else v.encode("latin-1")

    lines = [f"{method} {path} HTTP/1.1".encode()]
    for name, value in headers:
        lines.append(raw(name) + b": " + raw(value))
    if chunked:
        lines.append(b"transfer-encoding: chunked")
        payload = b"".join(
            b"%x\r\n" % len(body[i:i + chunk_size]) + body[i:i + chunk_size] + b"\r\n"
            for i in range(0, len(body), chunk_size)) + b"0\r\n\r\n"
    else:
        lines.append(b"content-length: %d" % len(body))
        payload = body
    return b"\r\n".join(lines) + b"\r\n\r\n" + payload


@dataclass
class H2Request:
    """One HTTP/2 request; ``trailers`` end the stream instead of the body."""

    path: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    trailers: list[tuple[str, str]] | None = None
    method: str = "POST"


def h2c(address: str, requests: list[H2Request], timeout: float = 15.0) -> list[RawResponse]:
    """Sends ``requests`` one after the other on one h2c connection.

    Each request is HEADERS, its body in DATA frames (within the flow-control
    windows) and, with ``trailers``, a trailing HEADERS frame that carries
    END_STREAM, so the body never ends by itself. Returns the responses in order.
    """
    config = h2.config.H2Configuration(client_side=True, header_encoding="latin-1")
    conn = h2.connection.H2Connection(config=config)
    deadline = time.monotonic() + timeout
    out = []
    with _connect(address, timeout) as sock:
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        for req in requests:
            out.append(_h2_exchange(sock, conn, address, req, deadline))
        conn.close_connection()
        try:
            sock.sendall(conn.data_to_send())
        except OSError:
            pass
    return out


def _h2_exchange(sock: socket.socket, conn: h2.connection.H2Connection, address: str,
                 req: H2Request, deadline: float) -> RawResponse:
    sid = conn.get_next_available_stream_id()
    pseudo = [(":method", req.method), (":path", req.path), (":scheme", "http"),
              (":authority", address)]
    ends_with_headers = not req.body and not req.trailers
    conn.send_headers(sid, pseudo + list(req.headers), end_stream=ends_with_headers)
    sock.sendall(conn.data_to_send())

    status = 0
    headers: dict[str, str] = {}
    trailers: dict[str, str] = {}
    body = bytearray()
    pending = memoryview(req.body)
    body_done = ends_with_headers
    while True:
        # Send what the windows allow of the body, then its end.
        while not body_done:
            window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
            if pending and window <= 0:
                break
            chunk, pending = pending[:window], pending[window:]
            last = not pending
            if chunk:
                conn.send_data(sid, bytes(chunk), end_stream=last and not req.trailers)
            if last:
                if req.trailers:
                    conn.send_headers(sid, list(req.trailers), end_stream=True)
                elif not chunk:
                    conn.end_stream(sid)
                body_done = True
        sock.sendall(conn.data_to_send())

        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"h2c stream {sid} to {address}: no complete answer in time")
        sock.settimeout(remaining)
        data = sock.recv(65536)
        if not data:
            raise ConnectionError(f"h2c stream {sid}: connection closed before the answer ended")
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived) and event.stream_id == sid:
                headers = {k.lower(): v for k, v in event.headers}
                status = int(headers.pop(":status"))
            elif isinstance(event, h2.events.TrailersReceived) and event.stream_id == sid:
                trailers = {k.lower(): v for k, v in event.headers}
            elif isinstance(event, h2.events.DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if event.stream_id == sid:
                    body += event.data
            elif isinstance(event, h2.events.StreamReset) and event.stream_id == sid:
                raise ConnectionError(f"h2c stream {sid} reset (error code {event.error_code})")
            elif isinstance(event, h2.events.ConnectionTerminated):
                raise ConnectionError(f"h2c connection terminated: {event}")
            elif isinstance(event, h2.events.StreamEnded) and event.stream_id == sid:
                sock.sendall(conn.data_to_send())
                return RawResponse(status, headers, bytes(body), trailers)
        sock.sendall(conn.data_to_send())
