"""A sidecar restarted right after serving traffic binds its ports at once.

The sidecar closes `Connection: close` requests first, so those connections sit in TIME_WAIT
on its listening ports for a minute after it exits; without SO_REUSEADDR on every listener
(and on the supervisor's port check) the restart is refused with "Address already in use",
which in a Pod is a crash loop.
"""

from __future__ import annotations

import socket
import subprocess

import pytest
from sidecar_support import Backends, free_port, get, policy, run_sidecar

pytestmark = pytest.mark.timeout(120)


def time_wait_ports() -> set[int]:
    """Local ports of this network namespace's TCP connections in TIME_WAIT."""
    lines = subprocess.run(["ss", "-Htn", "state", "time-wait"], capture_output=True, text=True, check=True).stdout
    return {int(line.split()[2].rpartition(":")[2]) for line in lines.splitlines() if line.strip()}


def closed_by_the_server(address: tuple[str, int], request: bytes) -> bytes:
    """Send one request and read until the server closes: the server's side keeps the TIME_WAIT."""
    with socket.create_connection(address, timeout=10) as conn:
        conn.sendall(request)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
        return answer


@pytest.mark.parametrize("workers", [1, 2])
def test_restart_right_after_traffic_binds_the_same_ports(workers):
    backends = Backends()
    try:
        backends.start("v1")
        text = policy("reviews", {"v1": backends.port["v1"]}, "    - name: all\n      to: [{backend: v1}]\n")
        ports = {name: free_port() for name in ("outbound", "inbound", "admin", "health")}
        fixed = [f"--{name}=127.0.0.1:{port}" for name, port in ports.items()]
        with run_sidecar(text, *fixed, workers=workers):
            for _ in range(5):
                for port, target, host in ((ports["outbound"], "/", "reviews"), (ports["admin"], "/healthz", "a"),
                                           (ports["health"], "/readyz", "h")):
                    request = f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
                    assert closed_by_the_server(("127.0.0.1", port), request).startswith(b"HTTP/1.1 200")
        lingering = time_wait_ports() & set(ports.values())
        assert {ports["outbound"], ports["admin"], ports["health"]} <= lingering, f"no TIME_WAIT: {lingering}"
        with run_sidecar(text, *fixed, workers=workers) as again:
            assert again.outbound[1] == ports["outbound"]
            assert get(again.outbound).backend == "v1"
    finally:
        backends.close()
