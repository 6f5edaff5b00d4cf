"""What the lean engine's own Python costs per request (pytest-benchmark; figures, never asserted).

One GET through a pooled upstream connection and its response, driven through the engine's
real callbacks: `Downstream.data_received` (llhttp parses the request, an `Exchange` routes it
with `decide()` and writes its head upstream), then `Upstream.data_received` (llhttp parses the
response, the exchange answers the client, records metrics and returns the connection to the
pool). The transports are in-memory fakes that record what is written: the event loop and the
sockets are what this leaves out, so the figure is meshlet's own per-request code (the issue's
target: at most 10 µs). `bench/run.py` runs `test_one_get_through_a_pooled_connection` and
prints its median beside the load figures; by hand:

    .venv/bin/python -m pytest tests/unit/proxy/test_lean_speed.py --benchmark-max-time=2
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry
from test_proxy_speed import CANARY

from meshlet.proxy.config import SidecarConfig
from meshlet.proxy.lean.downstream import Downstream
from meshlet.proxy.lean.engine import LeanEngine
from meshlet.proxy.lean.upstream import Upstream, UpstreamPool
from meshlet.proxy.state import PolicyState, compile_policy
from meshlet.proxy.tap import TapHub
from meshlet.telemetry.proxy import ProxyMetrics

REQUEST = b"GET /reviews/1 HTTP/1.1\r\nHost: reviews\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n"
BACKENDS = {9081: b"v1\n", 9082: b"v2\n"}


def nginx_response(body: bytes) -> bytes:
    """What the bench's nginx backends answer (bench/harness/servers.py)."""
    return (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sat, 29 Nov 2026 08:43:00 GMT\r\n"
            b"Content-Type: text/plain\r\nContent-Length: %d\r\nConnection: keep-alive\r\n\r\n%s" % (len(body), body))


class RecordingTransport:
    """The parts of asyncio.Transport the engine calls, recording writes and flow control."""

    def __init__(self, peername: tuple[str, int] | None = None) -> None:
        self.written: list[bytes] = []
        self.reading = True
        self.closing = False
        self.extra = {"peername": peername, "socket": None, "ssl_object": None}

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self.extra.get(name, default)

    def close(self) -> None:
        self.closing = True

    abort = close

    def take(self) -> bytes:
        out = b"".join(self.written)
        self.written.clear()
        return out


class Rig:
    """A lean engine that never listens: one client connection, and one idle pooled connection
    per canary backend, as after a worker's first requests."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = LeanEngine(SidecarConfig(), PolicyState(compile_policy(CANARY, 1)),
                                 ProxyMetrics(CollectorRegistry()), TapHub())
        self.engine.loop = loop  # never run: the pooled path schedules nothing on it

        async def pool() -> UpstreamPool:  # the pool reads the running loop once
            return UpstreamPool()

        self.engine.pool = loop.run_until_complete(pool())
        self.client = RecordingTransport(("127.0.0.1", 40000))
        self.downstream = Downstream(self.engine, "outbound")
        self.downstream.connection_made(self.client)  # type: ignore[arg-type]
        self.upstreams: dict[int, Upstream] = {}
        for port in BACKENDS:
            conn = Upstream(self.engine.pool, ("127.0.0.1", port, None))
            conn.connection_made(RecordingTransport(("127.0.0.1", port)))  # type: ignore[arg-type]
            self.engine.pool.put(conn)
            self.upstreams[port] = conn

    def one_get(self) -> int:
        """The request in, its head to the backend the split picked, that backend's answer back; the port."""
        self.downstream.data_received(REQUEST)
        conn = self.downstream.active.upstream  # type: ignore[union-attr]
        port = conn.key[1]
        conn.data_received(RESPONSES[port])
        return port


RESPONSES = {port: nginx_response(body) for port, body in BACKENDS.items()}


@pytest.fixture
def rig() -> Iterator[Rig]:
    loop = asyncio.new_event_loop()
    try:
        yield Rig(loop)
    finally:
        loop.close()


def requests_counted(rig: Rig, backend: str) -> float:
    """meshlet_requests_total of the canary route's 200s to `backend`, whatever other labels it has."""
    wanted = {"direction": "outbound", "route": "canary", "backend": backend, "code": "200"}
    return sum(
        sample.value for family in rig.engine.metrics.registry.collect() for sample in family.samples
        if sample.name == "meshlet_requests_total" and wanted.items() <= sample.labels.items()
    )


class TestLeanSpeed:
    def test_one_get_through_a_pooled_connection(self, rig: Rig, benchmark):
        ports: list[int] = []

        def request() -> None:
            ports.append(rig.one_get())
            rig.client.written.clear()  # bounded memory over a long benchmark
            for conn in rig.upstreams.values():
                conn.transport.written.clear()  # type: ignore[union-attr]

        benchmark(request)
        assert rig.downstream.active is None and not rig.downstream.waiting
        assert sorted(len(idle) for idle in rig.engine.pool.idle.values()) == [1, 1]  # both back in the pool
        assert requests_counted(rig, "v1") == ports.count(9081)
        assert requests_counted(rig, "v2") == ports.count(9082)
        if len(ports) >= 200:
            assert ports.count(9081) > 3 * ports.count(9082) > 0  # the 90/10 split

    def test_the_benchmarked_path_is_a_whole_proxied_request(self, rig: Rig):
        """What the benchmark drives is the real thing: the head upstream, the answer back, keep-alive."""
        for _ in range(3):
            port = rig.one_get()
            sent = rig.upstreams[port].transport.take()  # type: ignore[union-attr]
            head, _, body = sent.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            assert lines[0] == b"GET /reviews/1 HTTP/1.1" and body == b""
            assert b"Host: reviews" in lines and b"User-Agent: wrk" in lines
            assert any(line.startswith(b"x-request-id: ") for line in lines)
            answer = rig.client.take()
            assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\n" + BACKENDS[port])
            assert b"Content-Length: 3\r\n" in answer
            assert b"Connection:" not in answer and b"Transfer-Encoding" not in answer  # hop-by-hop stripped
            assert not rig.client.closing and rig.client.reading
            assert rig.downstream.active is None
            assert rig.engine.pool.take(("127.0.0.1", port, None)) is rig.upstreams[port]  # pooled again
            rig.engine.pool.put(rig.upstreams[port])
        assert requests_counted(rig, "v1") + requests_counted(rig, "v2") == 3
