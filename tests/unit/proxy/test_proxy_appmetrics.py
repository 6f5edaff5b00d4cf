"""The health port's merged /metrics against real app servers on loopback: good pages, and apps
that are down, slow, failing, huge or talking nonsense (the sidecar's page is served every time)."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshlet.proxy import appmetrics
from meshlet.proxy.admin import read_only
from meshlet.proxy.appmetrics import AppMetrics, parse_app_metrics
from meshlet.proxy.httpserver import Reply, Request

SIDECAR = b"# HELP meshlet_policy_generation g\n# TYPE meshlet_policy_generation gauge\nmeshlet_policy_generation 3.0\n"
APP = b"# HELP orders_total Orders.\n# TYPE orders_total counter\norders_total{shop=\"a\"} 7.0\n"
OM = b"# TYPE orders counter\norders_total{shop=\"a\"} 7.0\n# EOF\n"

Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def http(status: int, body: bytes, content_type: str = "text/plain; version=0.0.4") -> Answer:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
                     .encode() + body)
        await writer.drain()
        writer.close()

    return answer


async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/openmetrics-text; version=1.0.0\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")
    for piece in (OM[:10], OM[10:]):
        writer.write(b"%x\r\n%b\r\n" % (len(piece), piece))
    writer.write(b"0\r\n\r\n")
    await writer.drain()
    writer.close()


async def not_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
    writer.close()


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(30)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def values(page: bytes) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(page.decode()) for s in family.samples}


async def scrape_with(answer: Answer | None, *requests: Request) -> tuple[list[bytes], list[bytes]]:
    """Serve `answer` on loopback, scrape the merged page once per request (concurrently): the
    pages, and the request heads the app saw."""
    heads: list[bytes] = []

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        reader.feed_data(heads[-1])  # the answer reads the head again
        assert answer is not None
        await answer(reader, writer)

    server = await asyncio.start_server(app, "127.0.0.1", 0) if answer is not None else None
    port = server.sockets[0].getsockname()[1] if server is not None else closed_port()
    merged = AppMetrics(parse_app_metrics(f"http://127.0.0.1:{port}/metrics"), lambda: SIDECAR)
    try:
        replies = await asyncio.gather(*(merged.handle(r) for r in requests or (Request("GET", "/metrics", {}),)))
    finally:
        if server is not None:
            server.close()
    assert all(reply.status == 200 and reply.body.startswith(SIDECAR) for reply in replies)
    return [reply.body for reply in replies], heads


def scrape(answer: Answer | None, *requests: Request) -> tuple[list[bytes], list[bytes]]:
    return asyncio.run(scrape_with(answer, *requests))


class TestFetch:
    def test_a_text_page_is_merged(self):
        [page], heads = scrape(http(200, APP))
        got = values(page)
        assert got[("orders_total", (("shop", "a"),))] == 7.0
        assert got[("meshlet_policy_generation", ())] == 3.0
        assert got[("meshlet_app_metrics_up", ())] == 1.0
        assert heads[0].startswith(b"GET /metrics HTTP/1.1\r\n") and b"Accept: text/plain;version=0.0.4" in heads[0]

    def test_a_chunked_openmetrics_page_is_merged(self):
        [page], _ = scrape(chunked)
        assert values(page)[("orders_total", (("shop", "a"),))] == 7.0

    @pytest.mark.parametrize(("answer", "reason"), [
        (None, "connect"),
        (http(500, b"oops"), "status"),
        (http(200, b"<html>not metrics</html>", "text/html"), "invalid"),
        (not_http, "invalid"),
    ])
    def test_a_failed_scrape_keeps_the_sidecars_page_and_counts_why(self, answer, reason, caplog):
        [page], _ = scrape(answer)
        got = values(page)
        assert got[("meshlet_policy_generation", ())] == 3.0
        assert got[("meshlet_app_metrics_up", ())] == 0.0
        assert got[("meshlet_app_metrics_scrape_errors_total", (("reason", reason),))] == 1.0
        assert f"{reason}:" in caplog.text and "serving the sidecar's metrics without them" in caplog.text

    def test_a_slow_app_is_cut_at_half_of_prometheus_timeout(self):
        request = Request("GET", "/metrics", {"x-prometheus-scrape-timeout-seconds": "0.4"})

        async def timed() -> float:
            loop = asyncio.get_running_loop()
            started = loop.time()
            [page], _ = await scrape_with(silent, request)
            assert values(page)[("meshlet_app_metrics_scrape_errors_total", (("reason", "timeout"),))] == 1.0
            return loop.time() - started

        assert asyncio.run(timed()) < 5.0  # TIMEOUT; 0.2 s expected (not asserted: a loaded machine)

    def test_a_page_too_slow_to_parse_times_out_and_is_parsed_once_at_a_time(self):
        """Reading and parsing share the timeout; the parse that goes on (a thread cannot be
        stopped) fails the next scrape at once instead of starting a second one."""
        page = b"".join(b'big{n="%d"} 1\n' % i for i in range(150_000))  # ~2.5 MB: seconds to parse
        request = Request("GET", "/metrics", {"x-prometheus-scrape-timeout-seconds": "0.2"})

        fetches: list[int] = []

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            fetches.append(1)
            await http(200, page)(reader, writer)

        async def twice() -> list[bytes]:
            server = await asyncio.start_server(answer, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            merged = AppMetrics(parse_app_metrics(f"http://127.0.0.1:{port}/metrics"), lambda: SIDECAR)
            try:
                return [(await merged.handle(request)).body for _ in range(2)]
            finally:
                server.close()

        first, second = asyncio.run(twice())
        assert len(fetches) == 1
        assert values(first)[("meshlet_app_metrics_scrape_errors_total", (("reason", "timeout"),))] == 1.0
        assert values(second)[("meshlet_app_metrics_scrape_errors_total", (("reason", "timeout"),))] == 2.0
        assert values(second)[("meshlet_policy_generation", ())] == 3.0

    def test_a_huge_page_is_refused(self, monkeypatch):
        monkeypatch.setattr(appmetrics, "MAX_BYTES", 1000)
        [page], _ = scrape(http(200, b"x 1\n" * 1000))
        assert values(page)[("meshlet_app_metrics_scrape_errors_total", (("reason", "too_large"),))] == 1.0

    def test_concurrent_scrapes_share_one_fetch(self):
        pages, heads = scrape(http(200, APP), *[Request("GET", "/metrics", {})] * 5)
        assert len(heads) == 1
        assert all(values(page)[("orders_total", (("shop", "a"),))] == 7.0 for page in pages)

    def test_a_recovered_app_is_merged_again(self, caplog):
        caplog.set_level(logging.INFO, logger="meshlet.proxy.appmetrics")
        async def twice() -> list[bytes]:
            answers = iter([http(500, b""), http(200, APP)])
            server = await asyncio.start_server(lambda r, w: next(answers)(r, w), "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            merged = AppMetrics(parse_app_metrics(f"http://127.0.0.1:{port}/metrics"), lambda: SIDECAR)
            try:
                return [(await merged.handle(Request("GET", "/metrics", {}))).body for _ in range(2)]
            finally:
                server.close()

        first, second = asyncio.run(twice())
        assert values(first)[("meshlet_app_metrics_up", ())] == 0.0
        assert values(second)[("meshlet_app_metrics_up", ())] == 1.0
        assert values(second)[("meshlet_app_metrics_scrape_errors_total", (("reason", "status"),))] == 1.0
        assert "merged again" in caplog.text


class TestHealthPort:
    def test_only_get_and_nothing_in_the_request_chooses_the_target(self):
        fetched: list[str] = []

        async def merged(request: Request) -> Reply:
            fetched.append(request.target)
            return Reply(200, b"merged")

        async def api(request: Request) -> Reply:
            return Reply(200, b"api")

        handle = read_only(api, merged)

        async def ask(method: str, target: str) -> bytes | int:
            reply = await handle(Request(method, target, {}))
            assert isinstance(reply, Reply)
            return reply.body if reply.status == 200 else reply.status

        assert asyncio.run(ask("POST", "/metrics")) == 405
        assert asyncio.run(ask("PUT", "/policy")) == 404
        assert asyncio.run(ask("GET", "/healthz")) == b"api"
        assert asyncio.run(ask("GET", "/metrics")) == b"merged"

    def test_the_scrape_request_does_not_reach_the_app(self):
        request = Request("GET", "/metrics?target=http://10.0.0.1/&path=/admin", {"host": "evil"})
        _, heads = scrape(http(200, APP), request)
        assert heads[0].startswith(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:")
        assert b"evil" not in heads[0] and b"10.0.0.1" not in heads[0]


@pytest.mark.parametrize("url", ["http://127.0.0.1:9080/metrics", "https://[::1]:8443/stats?format=prom",
                                 "http://localhost/metrics"])
def test_app_metrics_urls_on_loopback(url):
    assert str(parse_app_metrics(url)).replace(":80/", "/") == url


@pytest.mark.parametrize(("url", "error"), [
    ("http://10.0.0.7:9080/metrics", "only its own Pod's app, on loopback"),
    ("http://metadata.google.internal/computeMetadata", "only its own Pod's app, on loopback"),
    ("ftp://127.0.0.1/metrics", "expected e.g. http://127.0.0.1:9080/metrics"),
    ("http://127.0.0.1:99999/metrics", "bad port"),
    ("http://127.0.0.1:9080", "the path must start with /"),
])
def test_app_metrics_urls_elsewhere_are_refused(url, error):
    with pytest.raises(ValueError, match=error):
        parse_app_metrics(url)
