"""HTTP/2 connections to backends: one multiplexed connection per backend carries many streams.

Unlike HTTP/1.1, a request does not take a connection for itself: it opens a stream on the
backend's connection while that has room (the peer's SETTINGS_MAX_CONCURRENT_STREAMS), and a
second connection is opened only when the first is full or going away. A GOAWAY from the
backend lets its streams in flight finish; streams it never processed fail as `reset` (and may
be retried elsewhere); new streams go to a new connection.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)

from meshlet.proxy.lean.h2endpoint import H2Endpoint
from meshlet.proxy.lean.http1 import Header

if TYPE_CHECKING:
    from meshlet.proxy.lean.stream import H2Exchange
    from meshlet.proxy.lean.upstream import PoolKey, UpstreamPool

log = logging.getLogger("meshlet.proxy")


class H2Upstream(H2Endpoint):
    def __init__(self, pool: UpstreamPool, key: PoolKey) -> None:
        super().__init__(client_side=True)
        self.pool = pool
        self.key = key
        self.streams: dict[int, H2Exchange] = {}
        self.going_away = False
        self.lost = False
        self.idle_since = 0.0
        self.principal = ""  # mesh mTLS: the SPIFFE ID the backend's certificate proved

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.idle_since = self.pool.loop.time()
        self.start()

    def has_room(self) -> bool:
        if self.lost or self.going_away or self.transport.is_closing():
            return False
        return len(self.streams) < min(self.conn.remote_settings.max_concurrent_streams, 1000)

    def open(self, exchange: H2Exchange, headers: list[Header], end: bool) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        self.streams[stream_id] = exchange
        self.send_headers(stream_id, headers, end)
        self.write_out()
        return stream_id

    def close_stream(self, stream_id: int) -> None:
        """The exchange is done with this stream (answered, reset, or given up)."""
        self.streams.pop(stream_id, None)
        self.forget(stream_id)
        if not self.streams:
            self.idle_since = self.pool.loop.time()

    def data_received(self, data: bytes) -> None:
        for event in self.feed(data):
            stream_id = getattr(event, "stream_id", 0)
            exchange = self.streams.get(stream_id) if stream_id else None
            if isinstance(event, DataReceived):
                if exchange is not None:
                    exchange.response_data(self, event.data, event.flow_controlled_length)
                else:  # a stream we gave up: its bytes still count against the connection window
                    self.acknowledge(stream_id, event.flow_controlled_length)
            elif exchange is None:
                if isinstance(event, WindowUpdated | RemoteSettingsChanged):
                    self.flush_backlog()
                elif isinstance(event, ConnectionTerminated):
                    self._going_away(event.last_stream_id)
            elif isinstance(event, ResponseReceived):
                exchange.response_headers(self, event.headers, event.stream_ended is not None)
            elif isinstance(event, TrailersReceived):
                exchange.response_trailers(self, event.headers)
            elif isinstance(event, StreamEnded):
                exchange.response_end(self)
            elif isinstance(event, StreamReset):
                exchange.upstream_failed(self, "reset", f"the backend reset the stream ({event.error_code!s})")
            elif isinstance(event, WindowUpdated | RemoteSettingsChanged):
                self.flush_backlog()
        self.write_out()

    def drained(self, stream_id: int) -> None:
        exchange = self.streams.get(stream_id)
        if exchange is not None:
            exchange.upstream_drained()

    def _going_away(self, last_stream_id: int) -> None:
        self.going_away = True
        self.pool.forget_h2(self)
        for stream_id, exchange in list(self.streams.items()):
            if stream_id > last_stream_id:  # never processed: safe to send again elsewhere
                self.close_stream(stream_id)
                exchange.upstream_failed(self, "reset", "the backend is going away (GOAWAY)")
        if not self.streams:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = self.closed = True
        self.pool.forget_h2(self)
        for exchange in list(self.streams.values()):
            exchange.upstream_failed(self, "reset", f"connection closed: {exc or 'by the backend'}")
        self.streams.clear()

    def close(self) -> None:
        if self.transport is not None:
            self.flush_now()
            self.transport.close()
