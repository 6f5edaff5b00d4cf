"""`GET /tap` over real loopback sockets, in one event loop: the admin server's chunked stream,
and the supervisor's merge of several workers' streams, each ended by its client."""

from __future__ import annotations

import asyncio
import time

import pytest

from meshlet.proxy import httpserver
from meshlet.proxy.httpserver import Reply, Request, Stream, read_chunks
from meshlet.proxy.tap import TapHub, TapRecord, decode, hub_lines
from meshlet.proxy.tapmerge import WorkerTaps

pytestmark = pytest.mark.timeout(60)


def record(path: str) -> TapRecord:
    return TapRecord(time.time(), "outbound", "GET", "reviews", path, "r", "v1", 200, 0.001)


async def serve_tap(hub: TapHub) -> tuple[asyncio.Server, str]:
    async def handler(request: Request) -> Reply | Stream:
        return Stream(hub_lines(hub)) if request.path == "/tap" else Reply(404)

    server = await httpserver.start(handler, "127.0.0.1", 0)
    return server, f"127.0.0.1:{httpserver.bound_port(server)}"


async def open_tap(control: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, _, port = control.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /tap HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Transfer-Encoding: chunked" in head
    return reader, writer


async def until(condition, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_a_client_leaving_unsubscribes_and_the_sidecar_stopping_ends_the_stream():
    async def scenario() -> None:
        hub = TapHub()
        server, control = await serve_tap(hub)
        reader, writer = await open_tap(control)
        await until(lambda: hub.active)
        hub.publish(record("/one"))
        chunks = read_chunks(reader)
        assert decode(await chunks.__anext__()).path == "/one"
        writer.close()  # the client leaves while nothing is being sent
        await until(lambda: not hub.active)

        reader, writer = await open_tap(control)
        await until(lambda: hub.active)
        hub.publish(record("/two"))
        hub.close()  # the sidecar stops: what is queued, then the last chunk
        assert [decode(chunk).path async for chunk in read_chunks(reader)] == ["/two"]
        assert await reader.read() == b""  # and the connection closes
        writer.close()
        server.close()

    asyncio.run(scenario())


def test_the_supervisor_merges_every_worker_and_closes_them_all_when_its_client_leaves():
    async def scenario() -> None:
        hubs = [TapHub(), TapHub()]
        served = [await serve_tap(hub) for hub in hubs]
        taps = WorkerTaps(lambda: [control for _, control in served])
        lines = taps.lines()
        got: list[str] = []

        async def read() -> None:
            async for chunk in lines:
                got.extend(decode(line).path for line in chunk.splitlines())

        reading = asyncio.ensure_future(read())
        await until(lambda: all(hub.active for hub in hubs))
        for i in range(50):
            hubs[i % 2].publish(record(f"/{i}"))
        await until(lambda: len(got) == 50)
        assert sorted(got) == sorted(f"/{i}" for i in range(50))
        reading.cancel()  # the supervisor's client went away
        await asyncio.gather(reading, return_exceptions=True)
        await lines.aclose()
        await until(lambda: not any(hub.active for hub in hubs))
        for server, _ in served:
            server.close()

    asyncio.run(scenario())


def test_a_worker_started_later_is_joined_and_supervisor_stop_ends_the_stream():
    async def scenario() -> None:
        first, second = TapHub(), TapHub()
        workers = [await serve_tap(first)]
        taps = WorkerTaps(lambda: [control for _, control in workers])
        lines = taps.lines()
        reading = asyncio.ensure_future(lines.__anext__())
        await until(lambda: first.active)
        workers.append(await serve_tap(second))  # a restarted worker, on a new port
        await until(lambda: second.active, seconds=5.0)
        second.publish(record("/late"))
        assert decode(await reading).path == "/late"
        taps.close()
        assert [chunk async for chunk in lines] == []
        await until(lambda: not first.active and not second.active)
        for server, _ in workers:
            server.close()

    asyncio.run(scenario())
