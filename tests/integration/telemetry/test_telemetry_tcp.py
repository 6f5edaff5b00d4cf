"""Connections relayed at L4 (a WebSocket after its 101, a CONNECT tunnel) are counted in
istio_tcp_* at their close, with the bytes each way (Kiali's graph edges for TCP)."""

from __future__ import annotations

import socket
import time

import pytest
from sidecar_support import Backends, run_sidecar
from telemetry_support import samples, start_echo, start_upgrade_echo, wait_total

pytestmark = pytest.mark.timeout(60)
CLOSED = "istio_tcp_connections_closed_total"


@pytest.fixture(scope="module")
def servers():
    servers = Backends()
    try:
        yield start_upgrade_echo(servers), start_echo(servers)
    finally:
        servers.close()


@pytest.fixture(scope="module")
def sidecar(servers, engine):
    upgrade_echo, _ = servers
    policy = (
        "apiVersion: meshlet.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: chat}\nspec:\n  host: chat\n"
        f'  backends:\n    ws: {{address: "127.0.0.1:{upgrade_echo}", workload: chat-server, version: v3}}\n'
        "  routes:\n    - name: all\n      to: [{backend: ws}]\n"
    )
    with run_sidecar(policy, "--metrics-compat", "istio", "--workload", "frontend") as sidecar:
        yield sidecar
        assert "Traceback" not in sidecar.stderr()


def read_head(sock: socket.socket) -> bytes:
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        data = sock.recv(1)
        assert data, head
        head += data
    return head


def echo_through(sock: socket.socket, size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    sock.sendall(payload)
    back = b""
    while len(back) < size:
        data = sock.recv(65536)
        assert data
        back += data
    assert back == payload


def tcp_bytes(sidecar, service: str) -> tuple[float, float]:
    def one(name: str) -> float:
        return sum(s.value for s in samples(sidecar, name, destination_service=service))

    return one("istio_tcp_received_bytes_total"), one("istio_tcp_sent_bytes_total")


def test_websocket_relay_is_counted_at_its_close(sidecar):
    with socket.create_connection(sidecar.outbound, timeout=5) as sock:
        sock.sendall(b"GET /socket HTTP/1.1\r\nHost: chat\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        assert read_head(sock).startswith(b"HTTP/1.1 101")
        echo_through(sock, 3000)
        time.sleep(0.1)
        assert wait_total(sidecar, CLOSED, 1, seconds=0.5, destination_service="chat") == 0  # still open
    assert wait_total(sidecar, CLOSED, 1, destination_service="chat") == 1
    assert tcp_bytes(sidecar, "chat") == (3000, 3000)
    [opened] = samples(sidecar, "istio_tcp_connections_opened_total", destination_service="chat")
    assert {k: opened.labels[k] for k in ("reporter", "source_workload", "destination_workload",
                                          "destination_version", "request_protocol", "response_flags")} == {
        "reporter": "source", "source_workload": "frontend", "destination_workload": "chat-server",
        "destination_version": "v3", "request_protocol": "tcp", "response_flags": "-",
    }


def test_connect_tunnel_is_counted_at_its_close(sidecar, servers):
    _, echo = servers
    with socket.create_connection(sidecar.outbound, timeout=5) as sock:
        sock.sendall(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (echo, echo))
        assert read_head(sock).startswith(b"HTTP/1.1 200")
        echo_through(sock, 1234)
    assert wait_total(sidecar, CLOSED, 1, destination_service="unknown") == 1
    assert tcp_bytes(sidecar, "unknown") == (1234, 1234)
