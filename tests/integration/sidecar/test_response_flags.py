"""Honest counts end to end: what each client got (code 0 when nothing, Envoy's response flags),
every upstream attempt against its own backend, the access log, and L4 relays counted.

Backends misbehave on purpose (hang up, cut a body, answer slowly); the sidecar is a real
`meshlet run --metrics-compat istio --access-log FILE`.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

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


async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers after 3 s (the client is gone by then)."""
    await reader.readuntil(b"\r\n\r\n")
    await asyncio.sleep(3)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    writer.close()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A TCP service: every read comes back with one more byte."""
    while data := await reader.read(65536):
        writer.write(data + b"!")
        await writer.drain()
    writer.close()


def route(name: str, to: str, extra: str = "") -> str:
    return f"    - name: {name}\n      match: {{headers: {{x-route: {name}}}}}\n      to: [{to}]\n" + extra


ROUTES = (
    route("hangup", "{backend: hangup}")
    + route("cut", "{backend: cut}")
    + route("slow", "{backend: slow}")
    + route("retried", "{backend: bad, weight: 100}, {backend: good, weight: 0}",
            "      retries: {attempts: 1, retryOn: [5xx]}\n")
    + route("exhausted", "{backend: bad}", "      retries: {attempts: 1, retryOn: [5xx]}\n")
    + route("failover", "{backend: dead, weight: 100}, {backend: good, weight: 0}",
            "      retries: {attempts: 1, retryOn: [connect-failure]}\n")
    + route("down", "{backend: dead}", "      retries: {attempts: 1, retryOn: [connect-failure]}\n")
    + "    - name: other\n      to: [{backend: good}]\n"
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    loop = Backends()
    try:
        ports = {name: loop.serve(name, asyncio.start_server(handler, "127.0.0.1", 0))
                 for name, handler in (("hangup", hangup), ("cut", cut), ("slow", slow), ("echo", echo))}
        ports["good"], ports["bad"] = loop.start("good"), loop.start("bad", status=503)
        ports["dead"] = free_port()  # nothing listens there
        yield ports, tmp_path_factory.mktemp("log") / "access.log"
    finally:
        loop.close()


@pytest.fixture(scope="module")
def sidecar(world):
    ports, log = world
    backends = {name: port for name, port in ports.items() if name != "echo"}
    with run_sidecar(policy("reviews", backends, ROUTES), "--metrics-compat", "istio", "--access-log", str(log)) as sc:
        yield sc
        assert "Traceback" not in sc.stderr()


def counted(sidecar, name: str, **labels: str) -> float:
    _, text = admin(sidecar, "GET", "/metrics")
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and labels.items() <= s.labels.items())


def eventually(check, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not check() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert check()


def access_lines(log: Path, request_id: str) -> list[dict]:
    return [entry for line in log.read_text().splitlines() if (entry := json.loads(line))["request_id"] == request_id]


def raw_exchange(address: tuple[str, int], data: bytes) -> bytes:
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


def test_a_backend_that_hangs_up_is_a_502_the_sidecar_answered(sidecar):
    answer = get(sidecar.outbound, headers={"x-route": "hangup"})
    assert answer.status == 502
    assert counted(sidecar, "meshlet_requests_total", route="hangup", backend="hangup", code="502",
                   response_flags="UC") == 1
    assert counted(sidecar, "meshlet_upstream_requests_total", route="hangup", backend="hangup", code="0",
                   response_flags="UC") == 1


def test_a_body_cut_short_keeps_its_status_and_says_so(sidecar):
    answer = raw_exchange(sidecar.outbound, b"GET / HTTP/1.1\r\nHost: reviews\r\nx-route: cut\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"x" * CUT_AT)
    eventually(lambda: counted(sidecar, "meshlet_requests_total", route="cut", code="200", response_flags="UC") == 1)


def test_a_client_that_leaves_before_the_answer_is_code_0_not_502(sidecar, world):
    _, log = world
    with socket.create_connection(sidecar.outbound, timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: reviews\r\nx-route: slow\r\nx-request-id: left-early\r\n\r\n")
        time.sleep(0.3)
    eventually(lambda: counted(sidecar, "meshlet_requests_total", route="slow", code="0", response_flags="DC") == 1)
    assert counted(sidecar, "meshlet_requests_total", route="slow", code="502") == 0
    assert counted(sidecar, "istio_requests_total", reporter="source", response_code="0", response_flags="DC") == 1
    eventually(lambda: len(access_lines(log, "left-early")) == 1)
    entry = access_lines(log, "left-early")[0]
    assert (entry["response_code"], entry["response_flags"], entry["bytes_sent"]) == (0, "DC", 0)


def test_a_canary_5xx_retried_to_stable_still_counts_against_the_canary(sidecar):
    assert get(sidecar.outbound, headers={"x-route": "retried"}).backend == "good"
    assert counted(sidecar, "meshlet_requests_total", route="retried", backend="good", code="200") == 1
    assert counted(sidecar, "meshlet_requests_total", route="retried", backend="bad") == 0
    assert counted(sidecar, "meshlet_upstream_requests_total", route="retried", backend="bad", code="503") == 1
    assert counted(sidecar, "meshlet_upstream_requests_total", route="retried", backend="good", code="200") == 1


def test_retries_exhausted_on_5xx_keep_the_backends_answer(sidecar):
    assert get(sidecar.outbound, headers={"x-route": "exhausted"}).status == 503
    assert counted(sidecar, "meshlet_requests_total", route="exhausted", code="503", response_flags="URX") == 1
    assert counted(sidecar, "meshlet_upstream_requests_total", route="exhausted", backend="bad", code="503") == 2


def test_connect_failures_are_attempts_too(sidecar):
    assert get(sidecar.outbound, headers={"x-route": "failover"}).backend == "good"
    assert counted(sidecar, "meshlet_upstream_requests_total", route="failover", backend="dead", code="0",
                   response_flags="UF") == 1
    assert get(sidecar.outbound, headers={"x-route": "down"}).status == 503
    assert counted(sidecar, "meshlet_requests_total", route="down", backend="dead", code="503",
                   response_flags="UF,URX") == 1
    assert counted(sidecar, "meshlet_upstream_requests_total", route="down", backend="dead", code="0") == 2


def test_the_access_log_has_one_line_per_request_with_envoys_fields(sidecar, world):
    ports, log = world
    answer = get(sidecar.outbound, path="/a/path?q=1", headers={"x-route": "other", "x-request-id": "logged-1"})
    assert answer.status == 200
    eventually(lambda: len(access_lines(log, "logged-1")) == 1)
    entry = access_lines(log, "logged-1")[0]
    assert {k: entry[k] for k in ("method", "authority", "path", "protocol", "response_code", "response_flags",
                                  "upstream_host", "upstream_cluster", "route_name", "direction")} == {
        "method": "GET", "authority": "reviews", "path": "/a/path?q=1", "protocol": "HTTP/1.1",
        "response_code": 200, "response_flags": "-", "upstream_host": f"127.0.0.1:{ports['good']}",
        "upstream_cluster": "good", "route_name": "other", "direction": "outbound"}
    assert entry["bytes_sent"] == len(answer.body.encode()) and entry["start_time"].endswith("Z")


def test_a_connect_tunnel_is_counted_with_its_bytes_each_way(sidecar, world):
    ports, _ = world
    with socket.create_connection(sidecar.outbound, timeout=10) as sock:
        sock.sendall(f"CONNECT 127.0.0.1:{ports['echo']} HTTP/1.1\r\nHost: 127.0.0.1:{ports['echo']}\r\n\r\n".encode())
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        sock.sendall(b"\x16\x03\x01" + b"t" * 97)  # TLS the app originates: relayed untouched
        echoed = b""
        while len(echoed) < 101:
            echoed += sock.recv(4096)
    eventually(lambda: counted(sidecar, "istio_tcp_connections_closed_total", reporter="source") == 1)
    assert counted(sidecar, "istio_tcp_received_bytes_total", request_protocol="tcp") == 100  # from the client
    assert counted(sidecar, "istio_tcp_sent_bytes_total", request_protocol="tcp") == 101  # to the client
