"""Byte relays: what the lean engine does with traffic it does not read as HTTP.

A WebSocket after its 101, a CONNECT tunnel, and a redirected connection whose first bytes are
not HTTP (TLS the app originates, a database protocol) become two `Pipe`s, one per direction,
each writing what its transport reads into the other. Back-pressure crosses over: when one
side's write buffer fills, the other side stops reading. Half-closes are passed on. Each pipe
counts what it relayed; once both sides have closed, the relay's owner hears the totals once
(`Closed`: bytes from the client, bytes to the client), for istio_tcp_* (Kiali's graph).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

log = logging.getLogger("meshlet.proxy")
Closed = Callable[[int, int], None]  # (bytes received from the client, bytes sent to it)


class Tally:
    """The two pipes of one relay: reports their counts once, when the second side has closed."""

    __slots__ = ("done", "from_client", "open", "to_client")

    def __init__(self, done: Closed | None) -> None:
        self.done = done
        self.open = 2
        self.from_client: Pipe = None  # type: ignore[assignment]
        self.to_client: Pipe = None  # type: ignore[assignment]

    def other(self, pipe: Pipe) -> Pipe:
        return self.to_client if pipe is self.from_client else self.from_client

    def closed(self) -> None:
        self.open -= 1
        if self.open == 0 and self.done is not None:
            self.done(self.from_client.count, self.to_client.count)


class Pipe(asyncio.Protocol):
    """The receiving side of one direction: what arrives on our transport is written to `peer`."""

    __slots__ = ("count", "ended", "peer", "relays", "tally", "transport")

    def __init__(self, peer: asyncio.Transport, relays: set[asyncio.Transport], tally: Tally) -> None:
        self.peer = peer
        self.relays = relays  # the engine's open relay transports, closed at the end of a drain
        self.tally = tally
        self.count = 0  # bytes relayed this way
        self.ended = False  # our side sent its EOF
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.relays.add(self.transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        self.count += len(data)
        self.peer.write(data)

    def eof_received(self) -> bool:
        self.ended = True
        if self.tally.other(self).ended:  # both ways ended: nothing more can flow, both close
            self.peer.close()
            return False
        if self.peer.can_write_eof():
            self.peer.write_eof()
            return True  # keep our write side open: the other direction may still be talking
        self.peer.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.relays.discard(self.transport)  # type: ignore[arg-type]
        self.peer.close()
        self.tally.closed()

    # Our transport's write buffer is what the peer's reads fill: throttle the peer.
    def pause_writing(self) -> None:
        self.peer.pause_reading()

    def resume_writing(self) -> None:
        self.peer.resume_reading()


def splice(
    client: asyncio.Transport, upstream: asyncio.Transport, relays: set[asyncio.Transport],
    to_upstream: bytes = b"", to_client: bytes = b"", done: Closed | None = None,
) -> None:
    """Turn two open transports into a relay, first writing what each side had already sent;
    `done` hears the bytes each way once both sides have closed."""
    tally = Tally(done)
    client_pipe = tally.from_client = Pipe(upstream, relays, tally)
    upstream_pipe = tally.to_client = Pipe(client, relays, tally)
    client.set_protocol(client_pipe)
    upstream.set_protocol(upstream_pipe)
    client_pipe.connection_made(client)
    upstream_pipe.connection_made(upstream)
    if to_upstream:
        client_pipe.count += len(to_upstream)
        upstream.write(to_upstream)
    if to_client:
        upstream_pipe.count += len(to_client)
        client.write(to_client)
    client.resume_reading()
    upstream.resume_reading()


class Held(asyncio.Protocol):
    """Holds what an upstream sends between connecting and `splice` (server-first protocols speak first)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = False

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        self.eof = True
        return True


async def relay_to(
    client: asyncio.Transport, destination: tuple[str, int], pending: Callable[[], bytes],
    relays: set[asyncio.Transport], answer: bytes = b"", done: Closed | None = None,
) -> bool:
    """Connect to `destination` and relay `client` there: `pending()` gives what the client sent
    so far (read once connected), `answer` goes to the client first (a CONNECT's 200), `done`
    hears the bytes each way at the end (the sidecar's own `answer` is not counted).
    False when the destination refused; the caller answers the client."""
    loop = asyncio.get_running_loop()
    client.pause_reading()
    try:
        upstream, held = await loop.create_connection(Held, *destination)
    except OSError as e:
        log.info("relay to %s:%d failed: %s", *destination, e.strerror or e)
        return False
    if client.is_closing():
        upstream.close()
        return True
    upstream.pause_reading()
    if answer:
        client.write(answer)
    splice(client, upstream, relays, pending(), bytes(held.data), done)  # type: ignore[arg-type]
    if held.eof:
        client.write_eof() if client.can_write_eof() else client.close()
    return True
