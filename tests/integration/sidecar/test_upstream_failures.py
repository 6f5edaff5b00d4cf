"""Backends that fail in the middle of an exchange, end to end: what the client got and each
attempt, counted honestly (the common cases, on both engines: tests/integration/telemetry/).

Backends misbehave on purpose (hang up after the request, cut a body short); the sidecar is a
real `meshlet run`.
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sidecar_support import Backends, admin, free_port, get, policy, run_sidecar

pytestmark = pytest.mark.timeout(60)

CUT_AT = 10  # body bytes a `cut` backend sends of the 1000 it announced


async def hangup(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reads the request head, then closes without a byte."""
    await reader.readuntil(b"\r\n\r\n")
    writer.close()


async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Announces 1000 body bytes, sends CUT_AT, closes."""
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * CUT_AT)
    await writer.drain()
    writer.close()


def route(name: str, to: str, extra: str = "") -> str:
    return f"    - name: {name}\n      match: {{headers: {{x-route: {name}}}}}\n      to: [{to}]\n" + extra


ROUTES = (
    route("hangup", "{backend: hangup}")
    + route("cut", "{backend: cut}")
    + route("failover", "{backend: dead, weight: 100}, {backend: good, weight: 0}",
            "      retries: {attempts: 1, retryOn: [connect-failure]}\n")
    + route("again", "{backend: dead}", "      retries: {attempts: 1, retryOn: [connect-failure]}\n")
    + "    - name: other\n      to: [{backend: good}]\n"
)


@pytest.fixture(scope="module")
def sidecar(engine):
    loop = Backends()
    try:
        ports = {name: loop.serve(name, asyncio.start_server(handler, "127.0.0.1", 0))
                 for name, handler in (("hangup", hangup), ("cut", cut))}
        ports["good"], ports["dead"] = loop.start("good"), free_port()  # nothing listens on `dead`
        with run_sidecar(policy("reviews", ports, ROUTES)) as sc:
            yield sc
            assert "Traceback" not in sc.stderr()
    finally:
        loop.close()


def counted(sidecar, name: str, **labels: str) -> float:
    _, text = admin(sidecar, "GET", "/metrics")
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and labels.items() <= s.labels.items())


def eventually(check, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not check() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert check()


def test_a_backend_that_hangs_up_is_a_502_the_sidecar_answered(sidecar):
    answer = get(sidecar.outbound, headers={"x-route": "hangup"})
    assert answer.status == 502
    assert counted(sidecar, "meshlet_requests_total", route="hangup", backend="hangup", code="502",
                   response_flags="UC") == 1
    assert counted(sidecar, "meshlet_upstream_requests_total", route="hangup", backend="hangup", code="0",
                   response_flags="UC") == 1


def test_a_body_cut_short_keeps_its_status_and_says_so(sidecar):
    with socket.create_connection(sidecar.outbound, timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: reviews\r\nx-route: cut\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"x" * CUT_AT)
    eventually(lambda: counted(sidecar, "meshlet_requests_total", route="cut", code="200", response_flags="UC") == 1)


def test_a_connect_failure_retried_elsewhere_is_an_attempt_of_its_own(sidecar):
    assert get(sidecar.outbound, headers={"x-route": "failover"}).backend == "good"
    assert counted(sidecar, "meshlet_upstream_requests_total", route="failover", backend="dead", code="0",
                   response_flags="UF") == 1
    assert counted(sidecar, "meshlet_requests_total", route="failover", backend="good", code="200",
                   response_flags="-") == 1


def test_a_route_with_one_backend_tries_it_again(sidecar):
    assert get(sidecar.outbound, headers={"x-route": "again"}).status == 503
    assert counted(sidecar, "meshlet_requests_total", route="again", backend="dead", code="503",
                   response_flags="UF,URX") == 1
    assert counted(sidecar, "meshlet_upstream_requests_total", route="again", backend="dead", code="0") == 2


