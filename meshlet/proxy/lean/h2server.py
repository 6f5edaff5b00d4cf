"""A client's HTTP/2 connection to the lean engine: every stream is a request of its own.

A connection becomes HTTP/2 three ways: prior-knowledge h2c (the client's first bytes are the
preface; gRPC's insecure channels do this), `Upgrade: h2c` on an HTTP/1.1 request, and ALPN `h2`
in a mesh mTLS handshake. Each stream is routed by itself (`decide()` per stream, with
`:authority` as the host), which is what lets a weighted split divide one long-lived gRPC
channel's calls. Draining sends a graceful GOAWAY: streams in flight finish, new ones go to a
new connection.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)

from meshlet.proxy.lean.h2endpoint import H2Endpoint
from meshlet.proxy.lean.http1 import Header
from meshlet.proxy.lean.stream import H2Exchange

if TYPE_CHECKING:
    from meshlet.proxy.lean.downstream import Downstream
    from meshlet.proxy.lean.engine import LeanEngine

log = logging.getLogger("meshlet.proxy")


class H2Downstream(H2Endpoint):
    """Takes over a client connection from `Downstream` (same engine bookkeeping, same peer)."""

    def __init__(self, http1: Downstream) -> None:
        super().__init__(client_side=False)
        self.engine: LeanEngine = http1.engine
        self.direction = http1.direction
        self.identity = http1.identity
        self.peer_ip = http1.peer_ip
        self.original_destination = http1.original_destination
        self.inbound_target = http1.inbound_target
        self.streams: dict[int, H2Exchange] = {}
        self.active: object | None = None  # a stream in flight (the engine's drain and sweep read it)
        self.head_started = 0.0
        self.idle_since = self.engine.loop.time()
        self.draining = False
        self.last_stream_id = 0
        self.corked = False  # an HTTP/1.1 backend's Upstream corks and flushes its client: frames go out in write_out

    def take_over(self, transport: asyncio.Transport, first: bytes = b"",
                  upgrade: tuple[bytes, H2Exchange] | None = None) -> None:
        """Become `transport`'s protocol. `upgrade` (HTTP2-Settings, the request as stream 1) for h2c."""
        self.transport = transport
        transport.set_protocol(self)
        self.engine.connections.add(self)  # type: ignore[arg-type]
        if upgrade is not None:
            settings, request = upgrade
            self.conn.initiate_upgrade_connection(settings)
            self.conn.increment_flow_control_window(1 << 24)
            self.write_out()
            request.bind(self, 1)
            self._opened(request)
        else:
            self.start()
        if first:
            self.data_received(first)
        transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        for event in self.feed(data):
            stream_id = getattr(event, "stream_id", 0)
            if isinstance(event, RequestReceived):
                self._request(event.stream_id, event.headers, event.stream_ended is not None)
            elif isinstance(event, DataReceived):
                exchange = self.streams.get(stream_id)
                if exchange is not None:
                    exchange.request_data(event.data, event.flow_controlled_length)
                else:
                    self.acknowledge(stream_id, event.flow_controlled_length)
            elif isinstance(event, StreamEnded):
                exchange = self.streams.get(stream_id)
                if exchange is not None:
                    exchange.request_end()
            elif isinstance(event, TrailersReceived):
                exchange = self.streams.get(stream_id)
                if exchange is not None:
                    exchange.request_trailers(event.headers)
            elif isinstance(event, StreamReset):
                exchange = self.streams.get(stream_id)
                if exchange is not None:
                    exchange.client_reset()
            elif isinstance(event, WindowUpdated | RemoteSettingsChanged):
                self.flush_backlog()
            elif isinstance(event, ConnectionTerminated):
                self.transport.close()
        self.write_out()

    def _request(self, stream_id: int, headers: list[Header], ended: bool) -> None:
        self.last_stream_id = max(self.last_stream_id, stream_id)
        if self.draining:  # after our GOAWAY: the client retries it on a new connection
            self.reset(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        exchange = H2Exchange.from_headers(self, stream_id, headers, ended)
        self._opened(exchange)

    def _opened(self, exchange: H2Exchange) -> None:
        self.streams[exchange.stream_id] = exchange
        self.active = exchange
        exchange.start()

    def exchange_done(self, exchange: H2Exchange) -> None:
        self.streams.pop(exchange.stream_id, None)
        if not self.streams:
            self.active = None
            self.idle_since = self.engine.loop.time()
            if self.draining or self.engine.draining:
                self.flush_now()
                self.transport.close()

    def flush(self) -> None:
        self.corked = False
        self.write_out()

    def throttle(self, on: bool) -> None:
        """An HTTP/1.1 backend's write buffer is full: the client's stream window already bounds it."""

    def drained(self, stream_id: int) -> None:
        exchange = self.streams.get(stream_id)
        if exchange is not None:
            exchange.client_drained()

    def drain(self) -> None:
        """SIGTERM: a graceful GOAWAY; the connection closes once its streams are done."""
        if self.draining:
            return
        self.draining = True
        self.goaway(self.last_stream_id)
        if not self.streams:
            self.abort()

    def sweep(self, now: float) -> None:
        if not self.streams and now - self.idle_since > self.engine.config.idle_timeout:
            self.drain()

    def abort(self) -> None:
        self.flush_now()
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.engine.connections.discard(self)  # type: ignore[arg-type]
        for exchange in list(self.streams.values()):
            exchange.client_reset()
        self.streams.clear()
        self.active = None
