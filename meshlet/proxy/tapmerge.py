"""The supervisor's `GET /tap` with `--workers N`: every worker's `/tap`, merged line by line.

Each stream opens its own `/tap` on every worker's private admin API and passes the lines on
as they come (workers send whole lines per chunk). A worker restarted meanwhile is joined at
the next look, once a second. The merged stream is bounded like a single process's: a client
slower than all workers together loses lines and is told (`{"lost": N}`). When the client goes
away, its connections to the workers close with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Callable, Iterable

from meshlet.proxy.httpserver import connect, read_chunks
from meshlet.proxy.tap import FEED_SIZE, Feed, encode

LOOK_SECONDS = 1.0  # how often a stream looks for workers it does not follow yet


async def follow(control: str, feed: Feed[bytes]) -> None:
    """Copy one worker's tap lines into `feed` until that stream ends (the worker stops)."""
    try:
        reader, writer = await connect(control)
    except OSError:
        return  # not listening (yet, or any more): the next look tries again
    try:
        writer.write(f"GET /tap HTTP/1.1\r\nHost: {control}\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200 "):
            return
        async for chunk in read_chunks(reader):
            for line in chunk.splitlines(keepends=True):
                feed.offer(line)
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
        return
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


class WorkerTaps:
    """`controls` gives the workers' private APIs (Unix socket paths, or `host:port`) as they are now."""

    def __init__(self, controls: Callable[[], Iterable[str]], feed_size: int = FEED_SIZE) -> None:
        self.controls = controls
        self.feed_size = feed_size
        self._feeds: set[Feed[bytes]] = set()

    def close(self) -> None:
        """The supervisor stops: every merged stream ends after what is queued."""
        for feed in self._feeds:
            feed.close()

    async def lines(self) -> AsyncGenerator[bytes, None]:
        feed: Feed[bytes] = Feed(self.feed_size)
        followers: dict[str, asyncio.Task] = {}
        self._feeds.add(feed)
        try:
            next_look = 0.0
            while True:
                now = time.monotonic()
                if now >= next_look:
                    self._look(feed, followers)
                    next_look = now + LOOK_SECONDS
                try:
                    batch = await asyncio.wait_for(feed.take(), next_look - now)
                except TimeoutError:
                    continue
                if not batch:
                    return
                yield b"".join(item if isinstance(item, bytes) else encode(item) for item in batch)
        finally:
            self._feeds.discard(feed)
            for task in followers.values():
                task.cancel()
            await asyncio.gather(*followers.values(), return_exceptions=True)

    def _look(self, feed: Feed[bytes], followers: dict[str, asyncio.Task]) -> None:
        current = set(self.controls())
        for control, task in list(followers.items()):
            if task.done() or control not in current:
                task.cancel()
                del followers[control]
        for control in current - followers.keys():
            followers[control] = asyncio.ensure_future(follow(control, feed))
