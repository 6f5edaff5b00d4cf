"""Which ports a `--workers` sidecar opens, and who can use the supervisor↔worker channel.

Read from the kernel (`ss`): the workers listen on the data-plane ports only; the control API
and the health port are the supervisor's; each worker's private API is a Unix socket in a
directory only the sidecar's user may enter, and only there are the internal headers obeyed.
"""

from __future__ import annotations

import http.client
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest
from sidecar_support import MESHLET, Backends, admin, free_port, load, policy, run_sidecar

pytestmark = pytest.mark.timeout(120)


def listeners(kind: str) -> list[tuple[str, set[int]]]:
    """(local address, owning pids) of this namespace's listening TCP (`t`) or Unix (`x`) sockets."""
    lines = subprocess.run(["ss", "-Hlp" + kind], capture_output=True, text=True, check=True).stdout.splitlines()
    column = 4 if kind == "x" else 3  # Unix sockets have a Netid column first
    return [(line.split()[column], {int(p) for p in re.findall(r"pid=(\d+)", line)}) for line in lines]


def test_workers_listen_only_on_the_data_plane_and_take_policies_over_a_private_socket():
    backends = Backends()
    try:
        backends.start("v1")
        backends.start("v2")
        port = backends.port
        first = policy("reviews", {"v1": port["v1"], "v2": port["v2"]}, "    - name: all\n      to: [{backend: v1}]\n")
        health = free_port()
        with run_sidecar(first, f"--health=127.0.0.1:{health}", workers=2) as sidecar:
            supervisor, workers = sidecar.process.pid, set(sidecar.children())
            assert len(workers) == 2
            tcp = {address.rpartition(":")[2]: pids for address, pids in listeners("t") if pids & {supervisor, *workers}}
            assert {int(p) for p, pids in tcp.items() if pids & workers} == {sidecar.outbound[1], sidecar.inbound[1]}
            assert {int(p) for p, pids in tcp.items() if supervisor in pids} == {sidecar.admin[1], health}
            sockets = [Path(path) for path, pids in listeners("x") if pids & workers]
            assert len(sockets) == 2 and len({s.parent for s in sockets}) == 1
            private = sockets[0].parent.stat()
            assert stat.S_IMODE(private.st_mode) == 0o700 and private.st_uid == os.getuid()

            generation = admin(sidecar, "GET", "/policy")[1]["generation"]
            second = first.replace("backend: v1", "backend: v2")
            internal = {"x-meshlet-generation": "999", "x-meshlet-weights": '{"reviews": {"all": {"v1": 100}}}'}
            conn = http.client.HTTPConnection(*sidecar.admin, timeout=15)
            conn.request("PUT", "/policy", body=second.encode(), headers=internal)
            response = conn.getresponse()
            assert response.status == 200 and f'"generation": {generation + 1}' in response.read().decode()
            conn.close()
            answers = load(sidecar.outbound, 40, connections=8)
            assert {a.backend for a in answers} == {"v2"}, "every worker took the policy, without the client's overlay"
    finally:
        backends.close()


def test_a_control_api_beyond_loopback_is_refused_before_anything_starts():
    result = subprocess.run([MESHLET, "run", "--policy", "policies/canary.yaml", "--admin", "0.0.0.0:0"],
                            capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[3])
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "meshlet: --admin 0.0.0.0:0: the control API (PUT /policy, rollouts, /certs) listens on loopback only "
        "(127.0.0.1 or ::1); probes and Prometheus use --health HOST:PORT, e.g. [::]:15020"
    ]
