"""`meshlet demo` (what `make run` runs): backends, sidecar, instructions, access log, clean Ctrl-C."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time

import pytest
from sidecar_support import MESHLET, get

DEMO_PORTS = (9081, 9082, 15000, 15001, 15006)


def access_lines(stdout, count: int) -> list[dict]:
    """The next `count` JSON access-log lines the demo prints (other lines skipped). Each was written
    before its response was sent, so they are there to read; the test's timeout bounds a demo that
    never logs."""
    found: list[dict] = []
    while len(found) < count:
        line = stdout.readline()
        assert line, f"the demo's stdout ended after {len(found)} access log lines"
        if line.startswith("{"):
            found.append(json.loads(line))
    return found


def _busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.timeout(60)
def test_demo_serves_the_canary_and_stops_on_ctrl_c():
    busy = [port for port in DEMO_PORTS if _busy(port)]
    if busy:
        pytest.skip(f"the demo's fixed ports {busy} are in use on this machine (another `make run`?)")
    process = subprocess.Popen([MESHLET, "demo"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 30
        while not any("change it" in line for line in lines):
            assert time.monotonic() < deadline and process.poll() is None, lines
            lines.append(process.stdout.readline())
        out = "".join(lines)
        assert "curl -s -H 'Host: reviews' http://127.0.0.1:15001/" in out
        assert "meshlet apply policies/ab-test.yaml" in out and "/metrics" in out
        answers = [get(("127.0.0.1", 15001), host="reviews") for _ in range(30)]
        assert {a.status for a in answers} == {200} and {a.backend for a in answers} <= {"v1", "v2"}
        logged = access_lines(process.stdout, 30)  # `make run` shows the access log
        assert {(e["authority"], e["route_name"], e["response_code"]) for e in logged} == {("reviews", "canary", 200)}
        assert {e["upstream_cluster"] for e in logged} <= {"v1", "v2"}
        process.send_signal(signal.SIGINT)
        assert process.wait(20) == 0
        assert "Traceback" not in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
        process.stdout.close()
        process.stderr.close()
