"""Honest counts on a real `meshlet run`: every upstream attempt against its own backend, Envoy's
response flags for requests that ended badly (code 0 when no response reached the client), and
the access log's JSON lines.

One sidecar for the module, one policy host per behaviour, so each test reads its own series.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
from raw_backend import RawBackend
from sidecar_support import Backends, Client, free_port, get, run_sidecar
from telemetry_support import total, wait_total

pytestmark = pytest.mark.timeout(120)
REQUESTS = "meshlet_requests_total"
ATTEMPTS = "meshlet_upstream_requests_total"


def host(name: str, backends: dict[str, int], route: str = "") -> str:
    """A policy for host `name`: its backends, and one route also named `name` over them in order
    (weight 100 on the first, 0 on the rest: where retries go next)."""
    lines = [f'    {b}: {{address: "127.0.0.1:{port}"}}' for b, port in backends.items()]
    targets = ", ".join(f"{{backend: {b}, weight: {100 if i == 0 else 0}}}" for i, b in enumerate(backends))
    return (
        f"apiVersion: meshlet.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: {name}}}\nspec:\n"
        f"  host: {name}\n  backends:\n" + "\n".join(lines) + f"\n  routes:\n    - name: {name}\n"
        f"      to: [{targets}]\n" + (f"      {route}\n" if route else "")
    )


@pytest.fixture(scope="module")
def backends():
    b = Backends()
    try:
        b.start("stable")
        b.start("canary", status=500)
        b.start("broken", status=503)
        b.raw = RawBackend()  # type: ignore[attr-defined]
        b.raw.start(b, "raw")  # type: ignore[attr-defined]
        yield b
    finally:
        b.close()


@pytest.fixture(scope="module")
def access_log(tmp_path_factory, engine) -> Path:  # one file per engine: request ids repeat
    return tmp_path_factory.mktemp("telemetry") / "access.log"


@pytest.fixture(scope="module")
def sidecar(backends, access_log, engine):
    port = backends.port
    closed, closed_too = free_port(), free_port()  # nothing listens there
    docs = [
        host("retried", {"canary": port["canary"], "stable": port["stable"]}, "retries: {attempts: 1, retryOn: [5xx]}"),
        host("down", {"gone": closed}),
        host("slow", {"raw": port["raw"]}, "timeout: 300ms"),
        host("patient", {"raw": port["raw"]}),
        host("exhausted", {"gone": closed, "gone-too": closed_too},
             "retries: {attempts: 1, retryOn: [connect-failure]}"),
        host("failing", {"canary": port["canary"], "broken": port["broken"]}, "retries: {attempts: 1, retryOn: [5xx]}"),
        host("logged", {"raw": port["raw"]}),
    ]
    with run_sidecar("---\n".join(docs), "--access-log", str(access_log)) as sidecar:
        yield sidecar
        assert "Traceback" not in sidecar.stderr()


def log_line(access_log: Path, request_id: str, seconds: float = 5.0) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        lines = [json.loads(line) for line in access_log.read_text().splitlines()] if access_log.exists() else []
        found = [line for line in lines if line["request_id"] == request_id]
        if found or time.monotonic() > deadline:
            assert len(found) == 1, lines
            return found[0]
        time.sleep(0.05)


def test_a_canary_5xx_retried_to_stable_counts_against_the_canary(sidecar):
    client = Client(sidecar.outbound)
    try:
        answers = [client.request(host="retried") for _ in range(20)]
    finally:
        client.close()
    assert {(a.status, a.backend) for a in answers} == {(200, "stable")}
    assert total(sidecar, ATTEMPTS, route="retried", backend="canary", code="500", response_flags="-") == 20
    assert total(sidecar, ATTEMPTS, route="retried", backend="stable", code="200", response_flags="-") == 20
    assert total(sidecar, REQUESTS, route="retried", backend="stable", code="200", response_flags="-") == 20
    assert total(sidecar, REQUESTS, route="retried", backend="canary") == 0  # the client never saw the canary's 5xx


def test_connect_failure_is_503_with_uf(sidecar):
    assert get(sidecar.outbound, host="down").status == 503
    assert total(sidecar, REQUESTS, route="down", backend="gone", code="503", response_flags="UF") == 1
    assert total(sidecar, ATTEMPTS, route="down", backend="gone", code="0", response_flags="UF") == 1


def test_route_timeout_is_504_with_ut(sidecar):
    assert get(sidecar.outbound, "/slow/3000", host="slow").status == 504
    assert total(sidecar, REQUESTS, route="slow", code="504", response_flags="UT") == 1
    assert total(sidecar, ATTEMPTS, route="slow", backend="raw", code="0", response_flags="UT") == 1


def test_client_gone_before_the_response_is_code_0_with_dc(sidecar, access_log):
    with socket.create_connection(sidecar.outbound, timeout=5) as sock:
        sock.sendall(b"GET /slow/2000 HTTP/1.1\r\nHost: patient\r\nx-request-id: gone-early\r\n\r\n")
        time.sleep(0.3)  # the request is at the backend
    assert wait_total(sidecar, REQUESTS, 1, route="patient", code="0", response_flags="DC") == 1
    assert total(sidecar, ATTEMPTS, route="patient", backend="raw", code="0", response_flags="DC") == 1
    line = log_line(access_log, "gone-early")
    assert (line["response_code"], line["response_flags"], line["bytes_sent"]) == (0, "DC", 0)


def test_retries_exhausted_add_urx_to_the_last_failure(sidecar):
    assert get(sidecar.outbound, host="exhausted").status == 503
    assert total(sidecar, REQUESTS, route="exhausted", code="503", response_flags="UF,URX") == 1
    assert total(sidecar, ATTEMPTS, route="exhausted", backend="gone", code="0", response_flags="UF") == 1
    assert total(sidecar, ATTEMPTS, route="exhausted", backend="gone-too", code="0", response_flags="UF") == 1
    # every backend answered 5xx: the client gets the last answer, flagged URX
    assert get(sidecar.outbound, host="failing").status == 503
    assert total(sidecar, REQUESTS, route="failing", backend="broken", code="503", response_flags="URX") == 1
    assert total(sidecar, ATTEMPTS, route="failing", backend="canary", code="500") == 1
    assert total(sidecar, ATTEMPTS, route="failing", backend="broken", code="503") == 1


def test_access_log_has_envoys_fields(sidecar, backends, access_log):
    client = Client(sidecar.outbound)
    try:
        answer = client.request("POST", "/cl/1000", {"x-request-id": "logged-1"}, b"hello", host="logged")
    finally:
        client.close()
    assert answer.status == 200
    line = log_line(access_log, "logged-1")
    started = line.pop("start_time")
    assert started.endswith("Z") and len(started) == len("2026-12-01T20:00:00.000Z")
    assert isinstance(line.pop("duration"), int)
    assert line == {
        "method": "POST", "authority": "logged", "path": "/cl/1000", "protocol": "HTTP/1.1",
        "response_code": 200, "response_flags": "-", "bytes_received": 5, "bytes_sent": 1000,
        "upstream_host": f"127.0.0.1:{backends.port['raw']}", "upstream_cluster": "raw", "route_name": "logged",
        "request_id": "logged-1", "downstream_peer_uri_san": None, "direction": "outbound", "grpc_status": None,
    }
