"""A client connection to the lean engine: parses requests and answers them in order.

llhttp (httptools) calls back as it parses; the callbacks only record, and a request whose head
is complete becomes an `Exchange`. Requests are answered in the order they came (pipelining):
one is active, the rest wait with their bodies held, and reading pauses while any wait. What
llhttp does not bound, this does: the request target (414), the header section (431) and the
time a client may take to send it (408); idle keep-alive connections are closed.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

import httptools

from meshlet.proxy.h2c import PREFACE
from meshlet.proxy.http1rules import MAX_HEAD_BYTES, MAX_HEADERS, MAX_TARGET_BYTES
from meshlet.proxy.inbound import Refused, inbound_target
from meshlet.proxy.lean.exchange import Exchange
from meshlet.proxy.lean.http1 import Header, Refusal, local_response
from meshlet.proxy.lean.relay import relay_to
from meshlet.proxy.origdst import original_destination_of
from meshlet.telemetry.outcome import UPSTREAM_CONNECT_FAILURE

if TYPE_CHECKING:
    from meshlet.proxy.lean.engine import LeanEngine

log = logging.getLogger("meshlet.proxy")

# Reasons to stop reading from the client, as bits: all must clear before reading resumes.
HOLD_QUEUE, HOLD_BACKLOG, HOLD_UPSTREAM = 1, 2, 4
MAX_PENDING = 256 * 1024  # bytes held after an Upgrade/CONNECT head or sniffed, before the relay takes them


def looks_like_http(data: bytes) -> bool:
    """An HTTP/1 request starts with its method, an upper-case token (`GET`, `CONNECT`, ...)."""
    return data[:1].isupper() and data[:1] != b"\x16"


class Downstream(asyncio.Protocol):
    __slots__ = (
        "active",
        "corked",
        "detached",
        "direction",
        "engine",
        "h2c",
        "head_fed",
        "head_started",
        "headers",
        "held",
        "identity",
        "idle_since",
        "inbound_target",
        "original_destination",
        "out",
        "parser",
        "parsing",
        "peer_ip",
        "pending",
        "refusal",
        "sniffed",
        "target",
        "transport",
        "waiting",
    )

    def __init__(self, engine: LeanEngine, direction: str) -> None:
        self.engine = engine
        self.direction = direction  # outbound | inbound
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser = httptools.HttpRequestParser(self)
        self.sniffed = False
        self.target = b""
        self.headers: list[Header] = []
        self.head_fed = 0
        self.head_started = 0.0
        self.idle_since = 0.0
        self.parsing: Exchange | None = None  # receiving its request body
        self.active: Exchange | None = None  # being answered
        self.waiting: deque[Exchange] = deque()
        self.held = 0
        self.corked = False  # while a backend's bytes are parsed: answers gather in `out`, one write
        self.out: list[bytes] = []
        self.detached = False  # the transport became a relay's (WebSocket, CONNECT, unknown protocol)
        self.pending: bytearray | None = None  # after an Upgrade/CONNECT head: bytes for the relay
        self.refusal: bytes | None = None  # a malformed pipelined request's answer, sent in turn
        self.h2c: tuple[bytes, Exchange] | None = None  # an accepted `Upgrade: h2c`: (HTTP2-Settings, request)
        self.identity: str | None = None
        self.peer_ip = ""
        self.original_destination: tuple[str, int] | None = None
        self.inbound_target: tuple[str, int] | None = None

    # --- connection ---------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        engine = self.engine
        self.idle_since = engine.loop.time()
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0] if peer else ""
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self.original_destination = original_destination_of(sock)
        engine.connections.add(self)
        if self.direction == "inbound":
            target = inbound_target(engine.config, self.original_destination, transport.get_extra_info("sockname"))
            if isinstance(target, Refused):
                log.info("inbound connection from %s refused: %s", self.peer_ip, target.reason)
                self.transport.abort()
                return
            self.inbound_target = target
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is not None:
                if not self._judge_peer():
                    return
                if ssl_object.selected_alpn_protocol() == "h2":
                    self.sniffed = True
                    self.become_h2()

    def _judge_peer(self) -> bool:
        from meshlet.proxy.lean.tls import peer_verdict  # loaded with the identity, not before

        verdict = peer_verdict(self.transport)
        engine = self.engine
        if not verdict.ok:
            engine.mtls_metrics.handshake("inbound", verdict.result)
            log.info("inbound mTLS peer %s refused: %s", self.peer_ip, verdict.detail)
            self.transport.abort()
            engine.refused()
            return False
        self.identity = verdict.identity
        if self.transport.get_extra_info("ssl_object").session_reused:
            engine.mtls_metrics.resumed.labels("inbound").inc()  # the peer was verified when the session began
        allow = engine.inbound_allow()
        engine.mtls_metrics.handshake("inbound", "denied" if allow and verdict.identity not in allow else "ok")
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.engine.connections.discard(self)
        active = self.active
        if active is not None:
            active.client_lost()
        for exchange in self.waiting:
            exchange.client_lost()
        self.waiting.clear()
        self.active = None

    def data_received(self, data: bytes) -> None:
        if self.pending is not None:  # an Upgrade/CONNECT or unknown protocol waits for its relay
            self.pending += data
            if len(self.pending) > MAX_PENDING:
                self.transport.pause_reading()
            return
        if not self.sniffed:
            self.sniffed = True
            if not looks_like_http(data) or data.startswith(PREFACE[:4]):
                self._not_http1(data)
                return
        if self.head_started:
            self.head_fed += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            if self.h2c is not None:  # `Upgrade: h2c` accepted: the request becomes stream 1
                settings, exchange = self.h2c
                self.become_h2(data[e.args[0]:], (settings, exchange.as_h2_stream()))
                return
            self.pending = bytearray(data[e.args[0]:])
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            if isinstance(cause, Refusal):
                self.refuse(cause.status, str(cause))
            else:
                log.exception("internal error on a client connection", exc_info=cause)
                self.refuse(500, "meshlet: internal error")
        except httptools.HttpParserError as e:
            self.refuse(400, f"meshlet: malformed request: {e}")
        else:
            if self.head_started and self.head_fed > MAX_HEAD_BYTES + MAX_TARGET_BYTES:
                self.refuse(431, "meshlet: request header section too large")

    def _not_http1(self, data: bytes) -> None:
        """HTTP/2 with prior knowledge (h2c) is served as HTTP/2; TLS or another protocol is relayed
        untouched to where the connection was going (policies apply to HTTP), else refused."""
        if data.startswith(PREFACE[:4]):
            self.become_h2(data)
            return
        destination = self.original_destination
        if destination is None or self.direction != "outbound" or self.engine.is_own_address(destination):
            self.transport.close()
            return
        self.pending = bytearray(data)
        self.detach()
        self.engine.spawn(self._relay(destination))

    async def _relay(self, destination: tuple[str, int]) -> None:
        closed = self.engine.relay_closed(self.direction)
        if not await relay_to(self.transport, destination, self.take_pending, self.engine.relays, done=closed):
            self.transport.close()
            closed(0, 0, UPSTREAM_CONNECT_FAILURE)

    def become_h2(self, first: bytes = b"", upgrade: tuple[bytes, Any] | None = None) -> None:
        """Hand the connection to the HTTP/2 framing (h2c preface, ALPN `h2`, or `Upgrade: h2c`)."""
        from meshlet.proxy.lean.h2server import H2Downstream

        self.detach()
        H2Downstream(self).take_over(self.transport, first, upgrade)

    def take_pending(self) -> bytes:
        pending, self.pending = self.pending, None
        return bytes(pending or b"")

    def detach(self) -> None:
        """The connection becomes a relay: no longer an HTTP connection of the engine's."""
        self.detached = True
        self.engine.connections.discard(self)
        self.transport.pause_reading()

    def abort(self) -> None:
        """Close once everything answered so far is written."""
        self.flush()
        self.transport.close()

    def send(self, data: bytes) -> None:
        if self.corked:
            self.out.append(data)
        else:
            self.transport.write(data)

    def flush(self) -> None:
        """One write (one syscall) for a response's head and body parsed from one read."""
        self.corked = False
        out = self.out
        if out:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    # --- llhttp callbacks -------------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.target = b""
        self.headers = []
        self.head_fed = 0
        self.head_started = self.engine.loop.time()

    def on_url(self, url: bytes) -> None:
        self.target += url
        if len(self.target) > MAX_TARGET_BYTES:
            raise Refusal(414, f"meshlet: request target longer than {MAX_TARGET_BYTES} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self.headers
        headers.append((name, value))
        self.head_fed += len(name) + len(value) + 4
        if self.head_fed > MAX_HEAD_BYTES or len(headers) > MAX_HEADERS:
            raise Refusal(431, f"meshlet: request header section over {MAX_HEAD_BYTES} bytes or "
                               f"{MAX_HEADERS} fields")

    def on_headers_complete(self) -> None:
        self.head_started = 0.0
        parser = self.parser
        exchange = Exchange(
            self, parser.get_method(), self.target, self.headers, parser.get_http_version() == "1.0",
            parser.should_keep_alive(), parser.should_upgrade(),
        )
        self.parsing = exchange
        if self.active is None:
            self.active = exchange
            exchange.start()
        else:
            self.waiting.append(exchange)
            self.hold(HOLD_QUEUE)

    def on_body(self, body: bytes) -> None:
        self.parsing.request_body(body)  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        self.parsing.request_complete()  # type: ignore[union-attr]

    # --- answers in order ------------------------------------------------------------------------------
    def exchange_done(self, exchange: Exchange) -> None:
        if exchange is not self.active:
            return
        self.active = None
        if self.detached:
            return
        if exchange.close_after or not exchange.keep_alive:
            self.abort()
            return
        if self.waiting:
            nxt = self.waiting.popleft()
            self.active = nxt
            if not self.waiting:
                self.release_hold(HOLD_QUEUE)
            nxt.start()
            return
        if self.refusal is not None:
            self.send(self.refusal)
            self.abort()
            return
        if self.pending is not None:  # an Upgrade answered without 101: HTTP/1.1 goes on
            self.engine.loop.call_soon(self._resume_http)
        self.idle_since = self.engine.loop.time()
        if self.engine.draining:
            self.abort()

    def _resume_http(self) -> None:
        """llhttp stops at an Upgrade request; when no protocol switch followed (h2c, which the
        sidecar declines; a WebSocket the backend refused), what the client sent next is parsed
        as HTTP/1.1 again, by a fresh parser."""
        if self.detached or self.transport.is_closing():
            return
        self.parser = httptools.HttpRequestParser(self)
        rest = self.take_pending()
        if not self.held:
            self.transport.resume_reading()
        if rest:
            self.data_received(rest)

    def refuse(self, status: int, message: str) -> None:
        """Answer a request llhttp or a limit refused, after those before it, and close."""
        self.transport.pause_reading()
        broken = self.parsing
        if broken is not None and not broken.request_done:  # its body broke off: that request is refused
            self.parsing = None
            if broken is self.active:
                broken.request_broken(status, message)
                return
            self.waiting.remove(broken)  # not started yet: refused in turn, below
        answer = local_response(status, message, close=True)
        self.engine.metrics.invalid(self.direction, status)
        if self.active is None:
            self.transport.write(answer)
            self.transport.close()
        else:
            self.refusal = answer

    def drain(self) -> None:
        """SIGTERM: an idle connection closes now, a busy one after its answer (Connection: close)."""
        if self.active is None and not self.head_started:
            self.abort()

    def sweep(self, now: float) -> None:
        """Once a second (LeanEngine): the header-read timeout and the idle keep-alive timeout."""
        config = self.engine.config
        if self.head_started and now - self.head_started > config.header_timeout:
            if self.active is None:
                self.refuse(408, f"meshlet: request head not received within {config.header_timeout:g}s")
            return
        if self.active is None and not self.head_started and now - self.idle_since > config.idle_timeout:
            self.transport.close()

    # --- flow control ------------------------------------------------------------------------------------
    def hold(self, reason: int) -> None:
        if not self.held:
            self.transport.pause_reading()
        self.held |= reason

    def release_hold(self, reason: int) -> None:
        if self.held & reason:
            self.held &= ~reason
            if not self.held and not self.transport.is_closing():
                self.transport.resume_reading()

    def throttle(self, on: bool) -> None:
        """The backend's write buffer is full (on) or drained (off)."""
        if on:
            self.hold(HOLD_UPSTREAM)
        else:
            self.release_hold(HOLD_UPSTREAM)

    # The client's write buffer fills from the backend's response: throttle the backend.
    def pause_writing(self) -> None:
        conn = self.active.upstream if self.active is not None else None
        if conn is not None and conn.transport is not None:
            conn.transport.pause_reading()
            conn.paused = True

    def resume_writing(self) -> None:
        conn = self.active.upstream if self.active is not None else None
        if conn is not None and conn.transport is not None and conn.paused:
            conn.transport.resume_reading()
            conn.paused = False
