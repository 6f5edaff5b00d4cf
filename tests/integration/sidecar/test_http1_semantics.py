"""HTTP/1.1 semantics through the sidecar: the backend sees the right request, the client the right answer.

Clients are raw sockets (exact bytes, framing checked) and curl (a real client's interop); the
backend is raw_backend, which records what arrived. Every test runs on both engines, but for
those marked with the engine they are about (README: "Where the engines differ").
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
from pathlib import Path

import pytest
from raw_backend import RawBackend, pattern, summary
from sidecar_support import Backends, policy, run_sidecar
from wire import Wire, request

pytestmark = pytest.mark.timeout(60)

HOST = b"Host: reviews\r\n"
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
HOP_BY_HOP = {"connection", "keep-alive", "te", "trailer", "proxy-connection", "upgrade"}


class Raw:
    """The module's backends: `main` (host reviews, and the inbound app), `bad` and `good` (host
    retry: bad answers 503, a retry must reach good), `spare` (host spare: nothing else uses it)."""

    def __init__(self, loop: Backends) -> None:
        self.main, self.bad, self.good, self.spare = RawBackend(), RawBackend(fail_with=503), RawBackend(), RawBackend()
        self.all = {"main": self.main, "bad": self.bad, "good": self.good, "spare": self.spare}
        for name, backend in self.all.items():
            backend.start(loop, name)

    def reset(self) -> None:
        for backend in self.all.values():
            backend.reset()


@pytest.fixture(scope="module")
def raw():
    loop = Backends()
    try:
        yield Raw(loop)
    finally:
        loop.close()


@pytest.fixture(scope="module")
def sidecar(raw, engine):
    documents = [
        policy("reviews", {"main": raw.main.port}, "    - name: all\n      to: [{backend: main}]\n"),
        policy("retry", {"bad": raw.bad.port, "good": raw.good.port}, (
            "    - name: retry\n      to: [{backend: bad, weight: 100}, {backend: good, weight: 0}]\n"
            "      retries: {attempts: 1, on: [5xx]}\n")),
        policy("spare", {"spare": raw.spare.port}, "    - name: all\n      to: [{backend: spare}]\n"),
    ]
    with run_sidecar("---\n".join(documents), app_port=raw.main.port) as sc:
        yield sc


@pytest.fixture
def main(raw):
    raw.reset()
    return raw.main


# --- bodies, every framing, both ways ---------------------------------------------------------------
def test_content_length_bodies_both_ways(sidecar, main):
    body = pattern(3000)
    with Wire(sidecar.outbound) as wire:
        wire.send(b"POST /cl/5000 HTTP/1.1\r\n" + HOST + b"Content-Length: 3000\r\n\r\n" + body)
        answer = wire.final()
    assert (answer.status, answer.framing, answer.body) == (200, "length", pattern(5000))
    seen = main.wait_for(1)[0]
    assert (seen.body, seen.field("content-length")) == (body, "3000")


def test_chunked_bodies_both_ways(sidecar, main):
    pieces = [pattern(1), pattern(4096, 1), pattern(70_000, 4097)]
    chunked = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    with Wire(sidecar.outbound) as wire:
        wire.send(b"POST /chunked/5000 HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n" + chunked)
        answer = wire.final()
        assert (answer.status, answer.framing, answer.body) == (200, "chunked", pattern(5000))
        wire.send(b"GET /cl/3 HTTP/1.1\r\n" + HOST + b"\r\n")  # the connection is still in step
        assert wire.final().body == pattern(3)
    seen = main.wait_for(1)[0]
    assert seen.body == b"".join(pieces)
    assert seen.field("content-length") is None


@pytest.mark.engines("lean")  # mitmproxy cannot read request trailers: it drops the connection (README)
def test_request_trailers_end_the_body_and_the_body_arrives(sidecar, main):
    with Wire(sidecar.outbound) as wire:
        wire.send(b"POST /echo HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n"
                  b"3\r\nabc\r\n0\r\nX-Checksum: 1\r\n\r\n")
        assert wire.final().body == summary(b"abc")
        wire.send(b"GET /cl/3 HTTP/1.1\r\n" + HOST + b"\r\n")
        assert wire.final().body == pattern(3)


def test_close_delimited_response_reaches_an_http11_client_intact(sidecar, main):
    answer = request(sidecar.outbound, b"GET /close/100000 HTTP/1.1\r\n" + HOST + b"\r\n")
    assert (answer.status, answer.body) == (200, pattern(100_000))


@pytest.mark.engines("lean")  # mitmproxy passes it on close-delimited (README: engine differences)
def test_close_delimited_response_is_rechunked_for_http11_and_the_connection_kept(sidecar, main):
    with Wire(sidecar.outbound) as wire:
        wire.send(b"GET /close/100000 HTTP/1.1\r\n" + HOST + b"\r\n")
        answer = wire.final()
        assert (answer.framing, answer.body) == ("chunked", pattern(100_000))
        wire.send(b"GET /cl/7 HTTP/1.1\r\n" + HOST + b"\r\n")
        assert wire.final().body == pattern(7)


def test_close_delimited_response_to_an_http10_client_ends_with_the_connection(sidecar, main):
    with Wire(sidecar.outbound) as wire:
        wire.send(b"GET /close/100000 HTTP/1.0\r\n" + HOST + b"\r\n")
        answer = wire.final()
        assert (answer.status, answer.framing, answer.body) == (200, "close", pattern(100_000))
        assert "chunked" not in (answer.field("transfer-encoding") or "")


@pytest.mark.parametrize("method,path,status", [("HEAD", "/head", 200), ("GET", "/status/204", 204),
                                                ("GET", "/status/304", 304)])
def test_bodiless_responses_leave_the_connection_usable(sidecar, main, method, path, status):
    with Wire(sidecar.outbound) as wire:
        wire.send(b"%s %s HTTP/1.1\r\n" % (method.encode(), path.encode()) + HOST + b"\r\n")
        answer = wire.final(method)
        assert answer.status == status
        if method == "HEAD":
            assert answer.field("content-length") == "1234"
        wire.send(b"GET /cl/11 HTTP/1.1\r\n" + HOST + b"\r\n")
        assert wire.final().body == pattern(11)
        assert not wire.buf  # no stray bytes: nothing was read as a body


def test_expect_100_continue(sidecar, main):
    body = pattern(20_000)
    with Wire(sidecar.outbound) as wire:
        wire.send(b"PUT /echo HTTP/1.1\r\n" + HOST + b"Expect: 100-continue\r\nContent-Length: 20000\r\n\r\n")
        interim = wire.response()
        assert interim.status == 100
        wire.send(body)
        answer = wire.final()
    assert (answer.status, answer.body) == (200, summary(body))
    assert main.wait_for(1)[0].body == body


@pytest.mark.engines("lean")  # mitmproxy takes a 103 for the response and drops the final one (README)
def test_an_interim_response_is_passed_on_then_the_final_one(sidecar, main):
    with Wire(sidecar.outbound) as wire:
        wire.send(b"GET /early HTTP/1.1\r\n" + HOST + b"\r\n")
        interim, final = wire.response(), wire.response()
        assert (interim.status, interim.field("link")) == (103, "</style.css>; rel=preload")
        assert (final.status, final.body) == (200, b"early\n")
        wire.send(b"GET /cl/3 HTTP/1.1\r\n" + HOST + b"\r\n")
        assert wire.final().body == pattern(3)


def test_pipelined_requests_are_answered_in_order(sidecar, main):
    body = pattern(10)
    with Wire(sidecar.outbound) as wire:
        wire.send(b"GET /slow/300 HTTP/1.1\r\n" + HOST + b"\r\n"
                  b"POST /echo HTTP/1.1\r\n" + HOST + b"Content-Length: 10\r\n\r\n" + body +
                  b"GET /chunked/2500 HTTP/1.1\r\n" + HOST + b"\r\n")
        answers = [wire.final() for _ in range(3)]
    assert [a.field("x-path") for a in answers] == ["/slow/300", "/echo", "/chunked/2500"]
    assert [a.body for a in answers] == [b"slow\n", summary(body), pattern(2500)]
    assert [r.target for r in main.wait_for(3)] == ["/slow/300", "/echo", "/chunked/2500"]


def test_an_upgrade_the_backend_declines_leaves_http11_going(sidecar, main):
    with Wire(sidecar.outbound) as wire:
        wire.send(b"GET /cl/3 HTTP/1.1\r\n" + HOST + b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
                  b"GET /cl/4 HTTP/1.1\r\n" + HOST + b"\r\n")
        assert [wire.final().body, wire.final().body] == [pattern(3), pattern(4)]


@pytest.mark.engines("mitmproxy")  # the lean engine accepts h2c (next test, and test_grpc.py)
def test_an_h2c_upgrade_is_served_as_http11_and_not_forwarded(sidecar, main):
    """Forwarded, a 101 would let later requests pass as bytes, past the policy: declined."""
    with Wire(sidecar.outbound) as wire:
        wire.send(b"GET /cl/3 HTTP/1.1\r\n" + HOST + b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                  b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n")
        answer = wire.final()
        assert (answer.status, answer.body) == (200, pattern(3))
        wire.send(b"GET /cl/4 HTTP/1.1\r\n" + HOST + b"\r\n")
        assert wire.final().body == pattern(4)
    assert not main.wait_for(2)[0].names() & {"upgrade", "http2-settings", "connection"}


# --- HTTP/1.0 --------------------------------------------------------------------------------------
def host_as_required(seen, host: str) -> bool:
    """RFC 9112 §3.2: an HTTP/1.1 request carries Host (the lean engine forwards HTTP/1.0 as 1.1 with
    one; mitmproxy forwards HTTP/1.0 as it came)."""
    return seen.field("host") == host if seen.version == "HTTP/1.1" else seen.version == "HTTP/1.0"


def keeps_alive(answer) -> bool:
    """RFC 9112 §9.3, as an HTTP/1.0 client reads a response."""
    tokens = {t.strip().lower() for t in (answer.field("connection") or "").split(",")}
    return "keep-alive" in tokens or (answer.version == "HTTP/1.1" and "close" not in tokens)


def test_http10_absolute_form_without_host_is_routed_and_closed(sidecar, main):
    with Wire(sidecar.outbound) as wire:
        wire.send(b"GET http://reviews/cl/100 HTTP/1.0\r\n\r\n")
        answer = wire.final()
        assert (answer.status, answer.body) == (200, pattern(100))
        assert wire.closed()
    seen = main.wait_for(1)[0]
    assert seen.target == "/cl/100"
    assert host_as_required(seen, "reviews"), seen.head


def test_http10_keep_alive(sidecar, main):
    with Wire(sidecar.outbound) as wire:
        for size in (5, 6):
            wire.send(b"GET /cl/%d HTTP/1.0\r\n" % size + HOST + b"Connection: keep-alive\r\n\r\n")
            answer = wire.final()
            assert (answer.body, answer.framing) == (pattern(size), "length")
            assert keeps_alive(answer), answer.headers
        wire.send(b"GET /chunked/3000 HTTP/1.0\r\n" + HOST + b"Connection: keep-alive\r\n\r\n")
        answer = wire.final()  # an HTTP/1.0 client cannot read chunked: the end is the close
        assert (answer.body, answer.framing) == (pattern(3000), "close")
        assert wire.closed()


def test_http10_without_host_on_the_outbound_listener_is_refused(sidecar, main):
    answer = request(sidecar.outbound, b"GET /cl/5 HTTP/1.0\r\n\r\n")
    assert answer.status == 400
    assert main.requests == []


def test_http10_without_host_on_the_inbound_listener_reaches_the_app(sidecar, main):
    with Wire(sidecar.inbound) as wire:
        wire.send(b"GET /cl/5 HTTP/1.0\r\n\r\n")
        assert wire.final().body == pattern(5)
        assert wire.closed()
    seen = main.wait_for(1)[0]
    assert seen.target == "/cl/5"
    assert host_as_required(seen, f"127.0.0.1:{main.port}"), seen.head


# --- what is forwarded --------------------------------------------------------------------------------
def test_hop_by_hop_fields_are_not_forwarded_either_way(sidecar, main):
    answer = request(sidecar.outbound, (
        b"GET /hop HTTP/1.1\r\n" + HOST + b"Connection: keep-alive, X-Client-Hop\r\nX-Client-Hop: 1\r\n"
        b"Keep-Alive: timeout=5\r\nTE: trailers\r\nTrailer: X-Checksum\r\nProxy-Connection: keep-alive\r\n"
        b"Upgrade: websocket\r\nX-End-To-End: kept\r\n\r\n"))
    seen = main.wait_for(1)[0]
    assert not seen.names() & (HOP_BY_HOP - {"connection"} | {"x-client-hop"}), seen.head
    own = {t.strip().lower() for t in (seen.field("connection") or "keep-alive").split(",")}
    assert own <= {"close", "keep-alive"}, seen.head  # the sidecar's own, for its own connection
    assert seen.field("x-end-to-end") == "kept"
    assert answer.status == 200
    assert not answer.names() & {"x-backend-hop", "keep-alive", "proxy-connection"}, answer.headers
    assert "x-backend-hop" not in (answer.field("connection") or "").lower()
    assert answer.field("x-end-to-end") == "kept"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_connection_cannot_unframe_a_request_body(sidecar, main, chunked):
    """A client naming the framing fields in Connection must not get its body read as a second
    request by the backend (request smuggling on the sidecar's pooled connection)."""
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: reviews\r\n\r\n"
    framing = b"Transfer-Encoding: chunked\r\n" if chunked else b"Content-Length: %d\r\n" % len(smuggled)
    body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(smuggled), smuggled) if chunked else smuggled
    with Wire(sidecar.outbound) as wire:
        wire.send(b"POST /echo HTTP/1.1\r\n" + HOST + b"Connection: Content-Length, Transfer-Encoding, Host\r\n" +
                  framing + b"\r\n" + body)
        assert wire.final().body == summary(smuggled)
        wire.send(b"GET /cl/2 HTTP/1.1\r\n" + HOST + b"\r\n")
        assert wire.final().body == pattern(2)
    assert [r.target for r in main.wait_for(3, timeout=1)] == ["/echo", "/cl/2"]


@pytest.mark.engines("lean")  # mitmproxy clears the target's authority before meshlet sees it (README)
def test_an_absolute_form_target_decides_the_host(sidecar, main):
    """RFC 9112 §3.2.2: routed by the target's authority, and forwarded with a Host made from it."""
    answer = request(sidecar.outbound, b"GET http://reviews/cl/4 HTTP/1.1\r\nHost: elsewhere.example\r\n\r\n")
    assert answer.body == pattern(4)
    assert [(n.lower(), v) for n, v in main.wait_for(1)[0].headers if n.lower() == "host"] == [("host", "reviews")]


def test_x_request_id_is_added_when_absent_and_kept_when_present(sidecar, main):
    request(sidecar.outbound, b"GET /a HTTP/1.1\r\n" + HOST + b"\r\n")
    request(sidecar.outbound, b"GET /b HTTP/1.1\r\n" + HOST + b"X-Request-Id: caller-chosen-42\r\n\r\n")
    first, second = main.wait_for(2)
    assert UUID.match(first.field("x-request-id") or ""), first.head
    assert [v for n, v in second.headers if n.lower() == "x-request-id"] == ["caller-chosen-42"]


# --- big bodies, slow peers, replays ------------------------------------------------------------------
def vm_rss(pid: int) -> int:
    """Resident memory in bytes."""
    line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def test_a_slow_reader_of_10_mb_keeps_the_sidecar_small_and_gets_every_byte(sidecar, main):
    size = 10_000_000
    pid = sidecar.process.pid
    request(sidecar.outbound, b"GET /big/%d HTTP/1.1\r\n" % 1_000_000 + HOST + b"\r\n")  # warm up the buffers
    before = vm_rss(pid)
    with Wire(sidecar.outbound) as wire:
        wire.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        wire.send(b"GET /big/%d HTTP/1.1\r\n" % size + HOST + b"\r\n")
        peak = before
        for _ in range(10):  # the client reads nothing for 0.5 s: the backend would fill the sidecar
            time.sleep(0.05)
            peak = max(peak, vm_rss(pid))
        answer = wire.final()
    assert answer.body == pattern(size)
    assert peak - before < size // 4, f"RSS grew by {(peak - before) / 1e6:.1f} MB for a {size / 1e6:.0f} MB body"


def test_a_5_mb_upload_streams_to_the_backend_intact(sidecar, main):
    body = pattern(5_000_000, 7)
    with Wire(sidecar.outbound) as wire:
        wire.send(b"PUT /upload HTTP/1.1\r\n" + HOST + b"Content-Length: %d\r\n\r\n" % len(body) + body[:1_000_000])
        deadline = time.monotonic() + 5
        while main.received < 500_000 and time.monotonic() < deadline:  # streamed: it arrives before the rest is sent
            time.sleep(0.01)
        assert main.received >= 500_000
        wire.send(body[1_000_000:])
        answer = wire.final()
    assert (answer.status, answer.body) == (200, summary(body))


def test_a_retried_put_replays_its_body_to_the_second_backend(sidecar, raw):
    raw.reset()
    body = pattern(20_000, 3)
    answer = request(sidecar.outbound, b"PUT /echo HTTP/1.1\r\nHost: retry\r\nContent-Length: 20000\r\n\r\n" + body)
    assert (answer.status, answer.body) == (200, summary(body))
    assert [r.body for r in raw.bad.requests] == [body]
    assert [r.body for r in raw.good.requests] == [body]


def fd_count(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def settled_fd_count(pid: int) -> int:
    """Once connections of earlier tests have finished closing (two equal counts 0.1 s apart)."""
    previous = fd_count(pid)
    for _ in range(20):
        time.sleep(0.1)
        current = fd_count(pid)
        if current == previous:
            break
        previous = current
    return previous


def test_a_client_leaving_mid_response_frees_the_backend_connection(sidecar, raw):
    pid = sidecar.process.pid
    spare = raw.spare
    baseline = settled_fd_count(pid)
    with Wire(sidecar.outbound) as wire:
        wire.send(b"GET /drip/300 HTTP/1.1\r\nHost: spare\r\n\r\n")  # 3 s of 1 KiB chunks
        assert wire.some(4000).startswith(b"HTTP/1.1 200 ")
        assert spare.open == 1
    deadline = time.monotonic() + 3
    while (spare.open or fd_count(pid) > baseline) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert spare.open == 0, "the sidecar kept the backend connection of a client that left"
    assert fd_count(pid) <= baseline


# --- curl ---------------------------------------------------------------------------------------------
def curl(sidecar, *args: str, data: bytes | None = None) -> subprocess.CompletedProcess:
    """curl through the sidecar as its HTTP proxy (absolute-form requests); `--next` starts
    another transfer of the same run, on the same connection when curl may reuse it."""
    proxy = ["-x", f"http://{sidecar.outbound[0]}:{sidecar.outbound[1]}"]
    command = ["curl", "-sS", "--noproxy", "", *proxy]
    for arg in args:
        command += [arg, *proxy] if arg == "--next" else [arg]
    return subprocess.run(command, input=data, capture_output=True, timeout=30, check=True)


def test_curl_uploads_chunked_and_with_expect_100_continue(sidecar, main):
    body = pattern(2_000_000, 11)
    chunked = curl(sidecar, "-T", "-", "http://reviews/up-chunked", data=body)  # stdin: chunked
    sized = curl(sidecar, "-v", "-H", "Expect: 100-continue", "--data-binary", "@-", "http://reviews/up-sized",
                 data=body)
    assert chunked.stdout == sized.stdout == summary(body)
    assert b"< HTTP/1.1 100 Continue" in sized.stderr  # not curl giving up waiting for it (1 s)
    seen = {r.target: r for r in main.wait_for(2)}
    assert seen["/up-chunked"].body == seen["/up-sized"].body == body


def test_curl_reuses_one_connection_across_204_304_chunked_and_head(sidecar, main):
    result = curl(sidecar, "-v", "-o", "/dev/null", "-o", "/dev/null", "-o", "/dev/null",
                  "http://reviews/status/204", "http://reviews/status/304", "http://reviews/chunked/10",
                  "--next", "-v", "-I", "http://reviews/head")
    assert result.stderr.count(b"Re-using existing connection") == 3, result.stderr.decode()
    assert b"Content-Length: 1234" in result.stdout


def test_curl_http2_over_cleartext_upgrades_or_stays_http11_on_one_connection(sidecar, main, engine):
    """curl --http2 on an http:// URL asks for h2c on its first request: the lean engine switches
    (101, then every request an HTTP/2 stream routed by policy), mitmproxy goes on in HTTP/1.1.
    Either way the upgrade is the sidecar's business: the backend sees none of its fields."""
    base = f"http://{sidecar.outbound[0]}:{sidecar.outbound[1]}"
    result = subprocess.run(["curl", "-sS", "-v", "--http2", "-m", "10", "-H", "Host: reviews", f"{base}/cl/3",
                             f"{base}/cl/4"], capture_output=True, timeout=30, check=True)
    assert result.stdout == pattern(3) + pattern(4)
    assert b"Re-using existing connection" in result.stderr
    upgraded = b"< HTTP/1.1 101 Switching Protocols" in result.stderr and b"< HTTP/2 200" in result.stderr
    assert upgraded == (engine == "lean"), result.stderr.decode(errors="replace")
    for seen in main.wait_for(2):
        assert not seen.names() & {"upgrade", "http2-settings", "connection"}


def test_curl_http10(sidecar, main):
    result = curl(sidecar, "--http1.0", "http://reviews/chunked/5000")
    assert result.stdout == pattern(5000)
