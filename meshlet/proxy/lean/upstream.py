"""Connections to backends: one keep-alive pool per worker, shared by every client connection.

As Envoy keeps a connection pool per upstream cluster, a worker keeps idle connections per
(address, TLS identity): a request takes one, or opens one, and gives it back once its response
ended cleanly with keep-alive on both sides. A connection is retired on any error, on
`Connection: close`, when a request body was cut short, and after `IDLE_SECONDS` unused.
The response parser (llhttp) belongs to the connection; the exchange using it gets its events.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING

import httptools

from meshlet.proxy.http1rules import MAX_HEAD_BYTES, MAX_HEADERS
from meshlet.proxy.lean.http1 import Header

if TYPE_CHECKING:
    from meshlet.mtls.upstream import UpstreamTls
    from meshlet.proxy.lean.exchange import Exchange
    from meshlet.proxy.lean.h2client import H2Upstream

MAX_IDLE_PER_KEY = 256  # idle connections kept per backend (and identity)
IDLE_SECONDS = 30.0  # below the keep-alive timeouts of common servers (nginx 75 s, Envoy 1 h)

PoolKey = tuple[str, int, tuple | None]  # host, port, and for mTLS (our serial, the expected peer)


class ConnectFailed(Exception):
    """No connection: refused, unreachable, or an mTLS peer that did not prove the identity."""


class Upstream(asyncio.Protocol):
    """One backend connection; serves one exchange at a time."""

    __slots__ = (
        "exchange", "head_bytes", "headers", "idle_since", "key", "lost", "parser", "paused", "pool", "principal",
        "reason", "reusable", "transport", "used",
    )

    def __init__(self, pool: UpstreamPool, key: PoolKey) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser: httptools.HttpResponseParser | None = None
        self.exchange: Exchange | None = None
        self.headers: list[Header] = []
        self.head_bytes = 0
        self.reason = b""
        self.idle_since = 0.0
        self.lost = False
        self.used = False  # has served an exchange: a failure before any answer may be a stale connection
        self.reusable = False  # set by the exchange when the response ended cleanly
        self.paused = False  # reading paused while the client's write buffer drains
        self.principal = ""  # mesh mTLS: the SPIFFE ID the backend's certificate proved

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:  # an idle connection is not spoken to first: the backend is confused
            self.close()
            return
        parser = self.parser
        if parser is None:
            parser = self.parser = httptools.HttpResponseParser(self)
        downstream = exchange.downstream
        downstream.corked = True
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            downstream.flush()
            exchange.upgraded(self, data[e.args[0]:])
        except httptools.HttpParserError as e:
            exchange.upstream_failed(self, "reset", f"garbled response: {e}")
        finally:
            if downstream.corked:
                downstream.flush()
        if self.reusable:  # only now, outside the parser: a waiting exchange may take it at once
            self.reusable = False
            self.pool.put(self)

    def eof_received(self) -> bool:
        exchange = self.exchange
        if exchange is not None:
            exchange.upstream_eof(self)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.pool.forget(self)
        exchange = self.exchange
        if exchange is not None:
            self.exchange = None
            exchange.upstream_failed(self, "reset", f"connection closed: {exc or 'by the backend'}")

    # llhttp callbacks
    def on_message_begin(self) -> None:
        self.headers = []
        self.head_bytes = 0
        self.reason = b""

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        self.head_bytes += len(name) + len(value) + 4
        if self.head_bytes > MAX_HEAD_BYTES or len(self.headers) > MAX_HEADERS:
            raise httptools.HttpParserError("response header section over the limit")

    def on_headers_complete(self) -> None:
        exchange = self.exchange
        if exchange is not None:
            exchange.response_head(self, self.parser.get_status_code(), self.reason, self.headers)  # type: ignore[union-attr]

    def on_body(self, body: bytes) -> None:
        exchange = self.exchange
        if exchange is not None:
            exchange.response_body(body)

    def on_message_complete(self) -> None:
        exchange = self.exchange
        if exchange is not None:
            exchange.response_complete(self, self.parser.should_keep_alive())  # type: ignore[union-attr]

    # Our write buffer fills from the client's request body: throttle the client.
    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.downstream.throttle(True)

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.downstream.throttle(False)

    def fresh_parser(self) -> None:
        """After a response whose body llhttp cannot know is absent (to a HEAD), start over."""
        self.parser = None

    def close(self) -> None:
        self.exchange = None
        if self.transport is not None:
            self.transport.close()


class UpstreamPool:
    def __init__(self) -> None:
        self.idle: dict[PoolKey, list[Upstream]] = {}
        self.h2: dict[PoolKey, list[H2Upstream]] = {}  # multiplexed: in use and idle alike
        self.h2_opening: dict[PoolKey, asyncio.Future] = {}
        self.loop = asyncio.get_running_loop()

    def take(self, key: PoolKey) -> Upstream | None:
        idle = self.idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.lost and not conn.transport.is_closing():  # type: ignore[union-attr]
                return conn
        return None

    def put(self, conn: Upstream) -> None:
        if conn.lost:
            return
        idle = self.idle.setdefault(conn.key, [])
        if len(idle) >= MAX_IDLE_PER_KEY:
            conn.close()
            return
        conn.exchange = None
        conn.used = True
        if conn.paused:
            conn.paused = False
            conn.transport.resume_reading()  # type: ignore[union-attr]
        conn.idle_since = self.loop.time()
        idle.append(conn)

    def forget(self, conn: Upstream) -> None:
        idle = self.idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    async def connect(self, key: PoolKey, tls: UpstreamTls | None, timeout: float | None) -> Upstream:
        """A new HTTP/1.1 connection; with `tls`, an mTLS one whose peer proved the expected identity."""
        return await self._open(lambda: Upstream(self, key), key, tls, timeout)  # type: ignore[return-value]

    def take_h2(self, key: PoolKey) -> H2Upstream | None:
        """An HTTP/2 connection to `key` with room for another stream."""
        for conn in self.h2.get(key, ()):
            if conn.has_room():
                return conn
        return None

    async def connect_h2(self, key: PoolKey, tls: UpstreamTls | None, timeout: float | None) -> H2Upstream:
        """A connection with room, opening one unless another stream is opening one already."""
        pending = self.h2_opening.get(key)
        if pending is not None:
            await asyncio.shield(pending)
            conn = self.take_h2(key)
            if conn is not None:
                return conn
        from meshlet.proxy.lean.h2client import H2Upstream

        opening = self.h2_opening[key] = self.loop.create_future()
        try:
            conn = await self._open(lambda: H2Upstream(self, key), key, tls, timeout)
        finally:
            del self.h2_opening[key]
            opening.set_result(None)
        self.h2.setdefault(key, []).append(conn)  # type: ignore[arg-type]
        return conn  # type: ignore[return-value]

    def forget_h2(self, conn: H2Upstream) -> None:
        conns = self.h2.get(conn.key)
        if conns and conn in conns:
            conns.remove(conn)

    async def _open(
        self, factory: Callable[[], asyncio.Protocol], key: PoolKey, tls: UpstreamTls | None, timeout: float | None,
    ) -> asyncio.Protocol:
        host, port = key[0], key[1]
        where = f"{host}:{port}"
        try:
            async with asyncio.timeout(timeout):
                if tls is None:
                    transport, conn = await self.loop.create_connection(factory, host, port)
                else:
                    transport, conn = await self.loop.create_connection(factory, host, port, ssl=tls.context,
                                                                        server_hostname="")
        except ssl.SSLError as e:
            from meshlet.mtls.upstream import classify

            assert tls is not None
            refused = classify(e)
            tls.record(refused.result)
            raise ConnectFailed(f"{where}: {refused}") from None
        except OSError as e:
            raise ConnectFailed(f"cannot connect to {where}: {e.strerror or e}") from None
        if tls is not None:
            from meshlet.mtls.upstream import check_leaf  # only with an identity (see LeanEngine)
            from meshlet.proxy.lean.tls import spiffe_id_of

            peer = transport.get_extra_info("ssl_object")
            der = peer.getpeercert(binary_form=True) if peer else None
            refused = check_leaf(der, tls.expect)
            tls.record(refused.result if refused else "ok")
            if refused is not None:
                transport.close()
                raise ConnectFailed(f"{where}: {refused}")
            conn.principal = spiffe_id_of(der)  # type: ignore[attr-defined]
        return conn

    def sweep(self, now: float) -> None:
        """Retire connections idle for longer than IDLE_SECONDS."""
        for idle in self.idle.values():
            for conn in [c for c in idle if now - c.idle_since > IDLE_SECONDS]:
                idle.remove(conn)
                conn.close()
        for conns in self.h2.values():
            for h2 in [c for c in conns if not c.streams and now - c.idle_since > IDLE_SECONDS]:
                conns.remove(h2)
                h2.close()

    def close(self) -> None:
        for idle in self.idle.values():
            for conn in idle:
                conn.close()
        self.idle.clear()
        for conns in self.h2.values():
            for h2 in conns:
                h2.close()
        self.h2.clear()
