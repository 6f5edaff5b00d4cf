"""Strict HTTP/1.1 (RFC 9112 §6.3, RFC 9110 §5.5): what could smuggle a request is refused and closed.

Each malformed request goes in exact bytes over a raw socket; the sidecar must answer the status
and close, and the scripted backend must not have received a byte of it. The barrier request
sent afterwards on a fresh connection proves that: it has to be the only thing the backend saw.
"""

from __future__ import annotations

import time

import pytest
from raw_backend import RawBackend
from sidecar_support import Backends, policy, run_sidecar
from wire import Wire, refused, request

pytestmark = pytest.mark.timeout(60)

HOST = b"Host: reviews\r\n"
ROUTES = "    - name: all\n      to: [{backend: raw}]\n"
TIMEOUT = 1  # --header-timeout and --idle-timeout of the module's sidecar, seconds


@pytest.fixture(scope="module")
def backend():
    loop = Backends()
    try:
        b = RawBackend()
        b.start(loop, "raw")
        yield b
    finally:
        loop.close()


@pytest.fixture(scope="module")
def sidecar(backend, engine):
    with run_sidecar(policy("reviews", {"raw": backend.port}, ROUTES),
                     "--header-timeout", str(TIMEOUT), "--idle-timeout", str(TIMEOUT)) as sc:
        yield sc


@pytest.fixture
def clean(backend):
    backend.reset()
    return backend


def get(fields: bytes = b"", target: bytes = b"/x") -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\n" + HOST + fields + b"\r\n"


def post(fields: bytes, body: bytes) -> bytes:
    return b"POST /x HTTP/1.1\r\n" + HOST + fields + b"\r\n" + body


def only_the_barrier_arrived(sidecar, backend: RawBackend, exact: bool = True, before: tuple[str, ...] = ()) -> None:
    """A good request, then: the backend saw it (after the requests `before` it) and nothing else.
    With `exact`, not a byte else either (a head-level refusal happens before any upstream
    connection is used)."""
    answer = request(sidecar.outbound, get(target=b"/barrier"))
    assert answer.status == 200
    seen = backend.wait_for(len(before) + 1)
    assert [r.target for r in seen] == [*before, "/barrier"]
    if exact:
        assert backend.received == sum(len(r.head) for r in seen)


CHUNKED = b"3\r\nabc\r\n0\r\n\r\n"
REFUSED = {
    "content-length with transfer-encoding": (post(b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n", CHUNKED), 400),
    "two differing content-length": (post(b"Content-Length: 3\r\nContent-Length: 4\r\n", b"abcd"), 400),
    "content-length list": (post(b"Content-Length: 3, 3\r\n", b"abc"), 400),
    "negative content-length": (post(b"Content-Length: -1\r\n", b"abc"), 400),
    "non-numeric content-length": (post(b"Content-Length: abc\r\n", b"abc"), 400),
    "transfer-encoding gzip": (post(b"Transfer-Encoding: gzip\r\n", b"abc"), 400),
    "chunked not final": (post(b"Transfer-Encoding: chunked, gzip\r\n", CHUNKED), 400),
    "chunked then gzip in two fields": (post(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n", CHUNKED), 400),
    "a coding the sidecar would have to undo": (post(b"Transfer-Encoding: gzip, chunked\r\n", CHUNKED), 501),
    "obs-fold": (get(b"X-Folded: one\r\n two\r\n"), 400),
    "NUL in a value": (get(b"X-Nul: o\x00ne\r\n"), 400),
    "CR in a value": (get(b"X-Cr: o\rne\r\n"), 400),
    "LF in a value": (get(b"X-Lf: o\nne\r\n"), 400),
    "whitespace before the colon": (get(b"X-Space : one\r\n"), 400),
    "two Host fields": (get(b"Host: elsewhere.example\r\n"), 400),
    "header section over 64 KiB": (get(b"".join(b"X-%d: %s\r\n" % (i, b"a" * 1000) for i in range(70))), 431),
    "one 300 KB field": (get(b"X-Big: " + b"a" * 300_000 + b"\r\n"), 431),
    "more than 100 fields": (get(b"".join(b"X-%d: 1\r\n" % i for i in range(101))), 431),
    "request target over 16 KiB": (get(target=b"/" + b"a" * 17_000), 414),
}


@pytest.mark.parametrize("data,status", REFUSED.values(), ids=REFUSED.keys())
def test_malformed_request_is_refused_closed_and_never_forwarded(sidecar, clean, data, status):
    answer, closed = refused(sidecar.outbound, data)
    assert answer.status == status, answer.body
    assert closed
    only_the_barrier_arrived(sidecar, clean)


def test_the_limits_are_not_lower_than_documented(sidecar, clean):
    """A 60 KiB header section and a 15 KiB target are passed on whole."""
    target = b"/" + b"t" * 15_000
    big = b"".join(b"X-%d: %s\r\n" % (i, b"v" * 1000) for i in range(60))
    answer = request(sidecar.outbound, get(big, target))
    assert answer.status == 200
    seen = clean.wait_for(1)[0]
    assert seen.target == target.decode() and seen.field("x-59") == "v" * 1000


def test_a_malformed_request_after_a_good_one_is_answered_in_turn(sidecar, clean):
    """Pipelined: the good request is answered first, then the refusal, then the connection closes."""
    with Wire(sidecar.outbound) as wire:
        wire.send(get(target=b"/slow/200") + get(b"X-Nul: \x00\r\n"))
        first, second = wire.final(), wire.final()
        assert (first.status, first.body, second.status) == (200, b"slow\n", 400)
        assert wire.closed()
    only_the_barrier_arrived(sidecar, clean, before=("/slow/200",))


def test_a_broken_body_after_a_good_request_never_reaches_the_backend(sidecar, clean):
    with Wire(sidecar.outbound) as wire:
        wire.send(get(target=b"/slow/200") + post(b"Transfer-Encoding: chunked\r\n", b"zz\r\n"))
        first = wire.final()
        rest = wire.rest()
        assert wire.eof
    assert (first.status, first.body) == (200, b"slow\n")
    assert not rest or rest.startswith(b"HTTP/1.1 400 ")
    only_the_barrier_arrived(sidecar, clean, exact=False, before=("/slow/200",))


def test_a_response_framed_two_ways_is_not_passed_on(sidecar, clean):
    """RFC 9112 §6.3: a backend's response with Content-Length and Transfer-Encoding gets 502."""
    answer = request(sidecar.outbound, get(target=b"/smuggle"))
    assert answer.status == 502
    assert b"abcde" not in answer.body


BROKEN = {"garbage size": b"zz\r\nabc\r\n0\r\n\r\n", "chunk overrun": b"3\r\nabcXY\r\n0\r\n\r\n",
          "negative size": b"-3\r\nabc\r\n0\r\n\r\n"}


@pytest.mark.parametrize("body", BROKEN.values(), ids=BROKEN.keys())
def test_a_broken_chunked_body_never_reaches_the_backend_as_a_request(sidecar, clean, body):
    """The head may already be on its way (bodies stream), but the backend never gets a complete
    request, and the client connection ends."""
    with Wire(sidecar.outbound) as wire:
        wire.send(post(b"Transfer-Encoding: chunked\r\n", body))
        reply = wire.rest()
        assert wire.eof
    assert not reply or reply.startswith(b"HTTP/1.1 400 ")
    only_the_barrier_arrived(sidecar, clean, exact=False)


@pytest.mark.engines("lean")  # mitmproxy closes without an answer (README: engine differences)
@pytest.mark.parametrize("body", BROKEN.values(), ids=BROKEN.keys())
def test_a_broken_chunked_body_gets_400(sidecar, clean, body):
    answer, closed = refused(sidecar.outbound, post(b"Transfer-Encoding: chunked\r\n", body))
    assert (answer.status, closed) == (400, True)


@pytest.mark.engines("lean")  # mitmproxy has no header-read timeout (README: engine differences)
def test_a_client_stalling_in_its_head_gets_408(sidecar, clean):
    with Wire(sidecar.outbound) as wire:
        wire.send(get()[:-2])  # the head, but for its final CRLF
        started = time.monotonic()
        answer = wire.final()
        waited = time.monotonic() - started
        assert answer.status == 408
        assert wire.closed()
    assert TIMEOUT <= waited < TIMEOUT + 3
    only_the_barrier_arrived(sidecar, clean)


def test_a_slow_body_or_a_slow_response_is_not_a_slow_head(sidecar, clean):
    """The header timeout covers the head only, and the idle timeout idle connections only: a body
    may take longer to arrive, and a response to come (waits long enough for a sweep to misfire)."""
    wait = TIMEOUT + 1.1
    with Wire(sidecar.outbound) as upload, Wire(sidecar.outbound) as slow:
        upload.send(b"POST /echo HTTP/1.1\r\n" + HOST + b"Content-Length: 6\r\n\r\nabc")
        slow.send(b"GET /slow/%d HTTP/1.1\r\n" % (wait * 1000) + HOST + b"\r\n")
        time.sleep(wait)
        upload.send(b"def")
        assert upload.final().body.startswith(b"6 ")
        assert slow.final().body == b"slow\n"


@pytest.mark.engines("lean")  # mitmproxy closes idle connections after its own 10 minutes
def test_an_idle_keep_alive_connection_is_closed(sidecar, clean):
    with Wire(sidecar.outbound) as wire:
        wire.send(get(target=b"/cl/1"))
        assert wire.final().status == 200
        assert not wire.closed(timeout=0.3)
        assert wire.closed(timeout=TIMEOUT + 3)
