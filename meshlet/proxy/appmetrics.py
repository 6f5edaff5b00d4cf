"""The health port's `/metrics` with the app's own metrics merged in (`meshlet run --app-metrics URL`).

Each scrape of the health port fetches the app's page once (scrapes that arrive meanwhile share
that fetch) and serves the sidecar's page, then the app's (meshlet.telemetry.merge). Reading
and parsing the app's page get at most `TIMEOUT` seconds together, or half of what Prometheus
says it waits (`X-Prometheus-Scrape-Timeout-Seconds`), and the page at most `MAX_BYTES`: an
app that is down, slow, huge or writes garbage costs the page its own series, never the
sidecar's, and the page, the log and `meshlet_app_metrics_scrape_errors_total{reason}` say so.

Who can make the sidecar fetch what: the URL is a start flag (injection writes it from the
Pod's own annotations) and names a loopback address only, so the sidecar fetches from its own
Pod and nowhere else. Nothing in a scrape request chooses what is fetched: the health port
takes `GET /metrics` with no parameters that reach the app.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

import httptools
from prometheus_client import CONTENT_TYPE_LATEST

from meshlet.proxy.httpserver import Reply, Request
from meshlet.telemetry.merge import ACCEPT, InvalidPage, ScrapeStats, merge, page_names, parse, render

log = logging.getLogger("meshlet.proxy.appmetrics")
TIMEOUT = 5.0  # seconds, at most, for the app's page
MAX_BYTES = 16 * 1024 * 1024
LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})
SCRAPE_TIMEOUT_HEADER = "x-prometheus-scrape-timeout-seconds"


@dataclass(frozen=True, slots=True)
class AppTarget:
    scheme: str
    host: str
    port: int
    target: str  # path and query, as sent

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.target}"


def parse_app_metrics(text: str) -> AppTarget:
    """`http(s)://LOOPBACK[:PORT]/PATH`; ValueError says what is wrong."""
    example = "expected e.g. http://127.0.0.1:9080/metrics"
    url = urllib.parse.urlsplit(text)
    try:
        port = url.port
    except ValueError:
        raise ValueError(f"--app-metrics {text!r}: bad port; {example}") from None
    if url.scheme not in ("http", "https") or not url.hostname or url.fragment or url.username:
        raise ValueError(f"--app-metrics {text!r}: {example}")
    if url.hostname not in LOOPBACK:
        raise ValueError(f"--app-metrics {text!r}: the sidecar fetches only its own Pod's app, on loopback "
                         f"({', '.join(sorted(LOOPBACK))})")
    if not url.path.startswith("/") or any(c.isspace() or ord(c) < 32 for c in url.path + url.query):
        raise ValueError(f"--app-metrics {text!r}: the path must start with / and have no spaces; {example}")
    target = url.path + (f"?{url.query}" if url.query else "")
    return AppTarget(url.scheme, url.hostname, port or (443 if url.scheme == "https" else 80), target)


class ScrapeFailed(Exception):
    """The app's page could not be had; `reason` is one of meshlet.telemetry.merge.REASONS."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class _Response:
    """httptools callbacks: the head and the body, bounded."""

    def __init__(self) -> None:
        self.content_type = ""
        self.body = bytearray()
        self.framed = False  # Content-Length or chunked: the end is known, EOF before it is an error
        self.headed = False
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-type":
            self.content_type = value.decode("latin-1")
        elif name in (b"content-length", b"transfer-encoding"):
            self.framed = True

    def on_headers_complete(self) -> None:
        self.headed = True

    def on_body(self, body: bytes) -> None:
        self.body += body
        if len(self.body) > MAX_BYTES:
            raise ScrapeFailed("too_large", f"the page is larger than {MAX_BYTES} bytes")

    def on_message_complete(self) -> None:
        self.complete = True


def _client_context() -> ssl.SSLContext:
    """For an app that serves its metrics over TLS (`prometheus.io/scheme: https`): on loopback,
    in the sidecar's own Pod, with whatever certificate the app has (as Prometheus' annotation
    jobs usually scrape them: insecure_skip_verify)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def _get(target: AppTarget) -> tuple[bytes, str]:
    tls = _client_context() if target.scheme == "https" else None
    reader, writer = await asyncio.open_connection(target.host, target.port, ssl=tls)
    try:
        host = f"[{target.host}]" if ":" in target.host else target.host
        writer.write(f"GET {target.target} HTTP/1.1\r\nHost: {host}:{target.port}\r\nAccept: {ACCEPT}\r\n"
                     f"User-Agent: meshlet-sidecar\r\nConnection: close\r\n\r\n".encode("latin-1"))
        response = _Response()
        parser = httptools.HttpResponseParser(response)
        while not response.complete:
            chunk = await reader.read(65536)
            if not chunk:
                break
            try:
                parser.feed_data(chunk)
            except httptools.HttpParserError as e:
                cause = e.__context__ if isinstance(e.__context__, ScrapeFailed) else None
                raise cause or ScrapeFailed("invalid", f"not an HTTP response ({e})") from None
    finally:
        writer.close()
    if not response.complete and (response.framed or not response.headed):
        raise ScrapeFailed("invalid", "the connection closed before the answer was complete")
    if parser.get_status_code() != 200:
        raise ScrapeFailed("status", f"answered {parser.get_status_code()}")
    return bytes(response.body), response.content_type


def _app_page(sidecar_names: set[str], body: bytes, content_type: str) -> tuple[bytes, list[str]]:
    """(the app's page as merged, the names left out); InvalidPage. CPU-bound: run in a thread."""
    merged = merge(sidecar_names, parse(body, content_type))
    return render(merged.families), merged.dropped


def _retrieve(future: asyncio.Future) -> None:
    """Mark an outcome seen: its waiters had it, or gave up waiting (a timeout)."""
    if not future.cancelled():
        future.exception()


def _timeout(header: str | None) -> float:
    """Half of Prometheus' own scrape timeout, so the sidecar's page still reaches it in time."""
    try:
        seconds = float(header or "")
    except ValueError:
        return TIMEOUT
    return min(TIMEOUT, seconds / 2) if seconds > 0 else TIMEOUT


class AppMetrics:
    """The merged `/metrics` of the health port; `sidecar_page` renders the sidecar's own page."""

    def __init__(self, target: AppTarget, sidecar_page: Callable[[], bytes]):
        self.target = target
        self.sidecar_page = sidecar_page
        self.stats = ScrapeStats()
        self._inflight: asyncio.Future[bytes] | None = None
        self._parsing: asyncio.Future[tuple[bytes, list[str]]] | None = None
        self._problem = ""  # the last failure logged; "" while the app's page merges

    async def handle(self, request: Request) -> Reply:
        sidecar = self.sidecar_page()
        try:
            app_page = await self._app_page(page_names(sidecar), request.headers.get(SCRAPE_TIMEOUT_HEADER))
        except ScrapeFailed:
            app_page = b""  # counted and logged by _scrape
        return Reply(200, sidecar + render(self.stats.families()) + app_page, CONTENT_TYPE_LATEST)

    async def _app_page(self, sidecar_names: set[str], scrape_timeout: str | None) -> bytes:
        """One fetch at a time, whoever asks: concurrent scrapes share it (and count once)."""
        if self._inflight is None:
            self._inflight = asyncio.ensure_future(self._scrape(sidecar_names, _timeout(scrape_timeout)))
            self._inflight.add_done_callback(self._done)
        return await asyncio.shield(self._inflight)

    def _done(self, future: asyncio.Future) -> None:
        self._inflight = None
        _retrieve(future)

    async def _scrape(self, sidecar_names: set[str], timeout: float) -> bytes:
        """The app's page as it goes into the merged one; ScrapeFailed, counted and logged, if none.

        `timeout` bounds reading and parsing together. A parse cannot be stopped (it runs in a
        thread, holding the GIL while it reads): one still running from an earlier scrape fails
        this one at once, so a huge page costs one thread's work at a time, not one per scrape."""
        started = time.monotonic()
        try:
            if self._parsing is not None and not self._parsing.done():
                raise ScrapeFailed("timeout", "the app's previous page is still being parsed")
            async with asyncio.timeout(timeout):
                body, content_type = await _get(self.target)
                self._parsing = asyncio.ensure_future(asyncio.to_thread(_app_page, sidecar_names, body, content_type))
                self._parsing.add_done_callback(_retrieve)
                page, dropped = await asyncio.shield(self._parsing)
        except TimeoutError:
            self._failed("timeout", f"no page within {timeout:g}s")
            raise ScrapeFailed("timeout", "") from None
        except OSError as e:
            self._failed("connect", e.strerror or str(e) or type(e).__name__)
            raise ScrapeFailed("connect", "") from None
        except ScrapeFailed as e:
            self._failed(e.reason, str(e))
            raise
        except InvalidPage as e:
            self._failed("invalid", str(e))
            raise ScrapeFailed("invalid", str(e)) from None
        finally:
            self.stats.seconds = time.monotonic() - started
        self._merged(dropped)
        return page

    def _failed(self, reason: str, message: str) -> None:
        assert self.stats.errors is not None
        self.stats.errors[reason] += 1
        self.stats.up = False
        self.stats.dropped = 0
        problem = f"{reason}: {message}"
        if problem != self._problem:
            log.warning("app metrics %s: %s; serving the sidecar's metrics without them", self.target, problem)
            self._problem = problem

    def _merged(self, dropped: list[str]) -> None:
        if self._problem:
            log.info("app metrics %s: merged again", self.target)
            self._problem = ""
        if dropped and len(dropped) != self.stats.dropped:
            log.warning("app metrics %s: left out %d famil%s whose names are the sidecar's or the mesh's: %s",
                        self.target, len(dropped), "y" if len(dropped) == 1 else "ies", ", ".join(dropped[:10]))
        self.stats.up = True
        self.stats.dropped = len(dropped)
