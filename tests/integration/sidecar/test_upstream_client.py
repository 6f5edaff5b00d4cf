"""meshlet's buffered upstream client against scripted loopback servers."""

from __future__ import annotations

import asyncio

import pytest
from mitmproxy import http
from sidecar_support import free_port

from meshlet.proxy.mitm.client import UpstreamError, UpstreamPool

pytestmark = [pytest.mark.timeout(30), pytest.mark.engines("mitmproxy")]  # the mitmproxy engine's own client


def request(method: str = "GET", path: str = "/") -> http.Request:
    return http.Request.make(method, f"http://reviews{path}", b"", {"host": "reviews"})


async def serve(answer: bytes, close_after: bool = False, delay: float = 0.0):
    """A server answering every request with `answer`; returns (server, port, connection count)."""
    connections = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                await asyncio.sleep(delay)
                writer.write(answer)
                await writer.drain()
                if close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], connections


def test_chunked_body_is_decoded_and_the_connection_reused():
    async def main():
        chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        server, port, connections = await serve(chunked)
        pool = UpstreamPool()
        try:
            first, identity = await pool.send(("127.0.0.1", port), request(), 5)
            second, _ = await pool.send(("127.0.0.1", port), request(), 5)
        finally:
            pool.close()
            server.close()
        assert first.raw_content == second.raw_content == b"abcde"
        assert first.headers["content-length"] == "5" and "transfer-encoding" not in first.headers
        assert len(connections) == 1 and identity == ""  # plain TCP: no peer identity

    asyncio.run(main())


def test_a_connection_the_backend_closed_is_replaced_silently():
    async def main():
        server, port, connections = await serve(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", close_after=True)
        pool = UpstreamPool()
        try:
            answers = [(await pool.send(("127.0.0.1", port), request(), 5)).response for _ in range(3)]
        finally:
            pool.close()
            server.close()
        assert [a.raw_content for a in answers] == [b"ok"] * 3
        assert len(connections) == 3

    asyncio.run(main())


def test_head_keeps_the_content_length_it_was_sent():
    async def main():
        server, port, _ = await serve(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
        pool = UpstreamPool()
        try:
            answer, _ = await pool.send(("127.0.0.1", port), request("HEAD"), 5)
        finally:
            pool.close()
            server.close()
        assert answer.headers["content-length"] == "1234" and answer.raw_content == b""

    asyncio.run(main())


def test_deadline_and_refusal_are_told_apart():
    async def main():
        server, port, _ = await serve(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", delay=5)
        pool = UpstreamPool()
        try:
            with pytest.raises(TimeoutError):
                await pool.send(("127.0.0.1", port), request(), 0.2)
            with pytest.raises(UpstreamError) as e:
                await pool.send(("127.0.0.1", free_port()), request(), 5)
        finally:
            pool.close()
            server.close()
        assert e.value.condition == "connect-failure"

    asyncio.run(main())
