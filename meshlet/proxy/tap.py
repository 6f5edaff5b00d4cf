"""Live request records for `meshlet tap`: engines publish, admin API subscribers read.

Tap costs nothing while nobody listens: engines test `hub.active` (a plain attribute, set while
someone subscribes) before building a record. A subscriber that reads slower than requests
finish loses records instead of slowing the proxy or growing its memory: each has a bounded
`Feed`, counts what it dropped and is told so in its stream (`{"lost": N}`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections import deque
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

FEED_SIZE = 4096  # records kept for one slow subscriber before it loses some

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class TapRecord:
    """One finished request, as `meshlet tap` prints it."""

    start: float  # wall clock, seconds since the epoch
    direction: str  # inbound | outbound
    method: str
    authority: str
    path: str
    route: str
    backend: str
    status: int  # 0: no response reached the client
    seconds: float
    peer_identity: str = ""  # the caller's SPIFFE ID, when mTLS verified one
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class Lost:
    """`count` items were dropped here because the subscriber read too slowly."""

    count: int


class Feed(Generic[T]):
    """One subscriber's bounded queue: `offer` never blocks and never grows it past `size`
    items. What a full feed drops is counted, and told (`Lost`) right after what it kept."""

    def __init__(self, size: int = FEED_SIZE) -> None:
        self.size = size
        self.lost_total = 0
        self._items: deque[T] = deque()
        self._lost = 0  # dropped since the last notice
        self._wake = asyncio.Event()
        self._closed = False

    def offer(self, item: T) -> None:
        if len(self._items) >= self.size:
            self._lost += 1
            self.lost_total += 1
            return
        self._items.append(item)
        self._wake.set()

    def close(self) -> None:
        """What is queued is still read; then `take` returns []."""
        self._closed = True
        self._wake.set()

    async def take(self) -> list[T | Lost]:
        """Everything queued, waiting until something is; [] once closed and read to the end."""
        while not self._items and not self._lost and not self._closed:
            self._wake.clear()
            await self._wake.wait()
        taken: list[T | Lost] = list(self._items)
        self._items.clear()
        if self._lost:
            taken.append(Lost(self._lost))
            self._lost = 0
        return taken


class TapHub:
    """One per sidecar process; engines `publish` (only when `active`), `/tap` subscribes."""

    def __init__(self, feed_size: int = FEED_SIZE) -> None:
        self.active = False
        self.feed_size = feed_size
        self._feeds: list[Feed[TapRecord]] = []
        self._closed = False

    def publish(self, record: TapRecord) -> None:
        for feed in self._feeds:
            feed.offer(record)

    @contextlib.contextmanager
    def subscribe(self) -> Iterator[Feed[TapRecord]]:
        feed: Feed[TapRecord] = Feed(self.feed_size)
        if self._closed:
            feed.close()
        self._feeds.append(feed)
        self.active = True
        try:
            yield feed
        finally:
            self._feeds.remove(feed)
            self.active = bool(self._feeds)

    def close(self) -> None:
        """The sidecar stops: every subscriber's stream ends once it has read what is queued."""
        self._closed = True
        for feed in self._feeds:
            feed.close()


def encode(item: TapRecord | Lost) -> bytes:
    """One JSON line: a record's fields by name, or `{"lost": N}`."""
    if isinstance(item, Lost):
        return b'{"lost": %d}\n' % item.count
    return json.dumps(dataclasses.asdict(item), separators=(", ", ": ")).encode() + b"\n"


def decode(line: bytes | str) -> TapRecord | Lost:
    """A line `encode` wrote; ValueError for anything else. Unknown fields (a newer sidecar) are skipped."""
    value = json.loads(line)
    if not isinstance(value, dict):
        raise ValueError(f"not a tap record: {line!r}")
    if "lost" in value:
        return Lost(int(value["lost"]))
    known = {f.name for f in dataclasses.fields(TapRecord)}
    try:
        return TapRecord(**{k: v for k, v in value.items() if k in known})
    except TypeError as e:
        raise ValueError(f"not a tap record: {e}") from None


async def hub_lines(hub: TapHub) -> AsyncGenerator[bytes, None]:
    """`GET /tap` of one sidecar process: subscribed from the first read until the stream is
    closed (the client left, or the sidecar stops)."""
    with hub.subscribe() as feed:
        while batch := await feed.take():
            yield b"".join(encode(item) for item in batch)
