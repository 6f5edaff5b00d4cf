"""`meshlet agent --accelerate --kernel-vip` as a real process: both accelerations work, their
metrics are exported, and SIGTERM removes every hook and pin."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshlet.ebpf import bpfsys

pytestmark = pytest.mark.root

MESHLET = Path(sys.executable).parent / "meshlet"
CGROUP_SOCK_OPS, CGROUP_INET4_CONNECT = 3, 10

POLICY = """\
apiVersion: meshlet.dev/v1alpha1
kind: TrafficPolicy
metadata: {{name: reviews}}
spec:
  host: reviews
  dataplane: kernel
  backends:
    v1: {{address: "127.0.0.1:{v1}"}}
    v2: {{address: "127.0.0.1:{v2}"}}
  routes:
    - name: canary
      to: [{{backend: v1, weight: 50}}, {{backend: v2, weight: 50}}]
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def samples(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def attached(cgroup, attach_type: int) -> tuple[int, ...]:
    with cgroup.fd() as fd:
        return bpfsys.attached_ids(fd, attach_type)


def test_agent_runs_both_accelerations_exports_them_and_removes_them_on_sigterm(
    cgroup, pin_root, workloads, greeters, tmp_path
):
    workload = workloads(cgroup)
    sidecar_port = workload.call("listen")["port"]
    v1, v2, vip = greeters("v1"), greeters("v2"), greeters("vip")
    policy = tmp_path / "reviews.yaml"
    policy.write_text(POLICY.format(v1=v1.port, v2=v2.port))
    metrics_port = free_port()
    log = tmp_path / "agent.log"
    argv = [str(MESHLET), "agent", "--pin-dir", str(pin_root / "agent"), "--metrics", f"127.0.0.1:{metrics_port}"]
    argv += ["--accelerate", "--cgroup", str(cgroup.path), "--sidecar-ports", str(sidecar_port)]
    argv += ["--policy", str(policy), "--kernel-vip", f"reviews=127.0.0.1:{vip.port}"]
    with log.open("w") as stderr:
        agent = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 60
        while "agent: ready" not in log.read_text():
            assert agent.poll() is None, f"agent exited {agent.returncode}: {log.read_text()}"
            assert time.monotonic() < deadline, f"agent not ready: {log.read_text()}"
            time.sleep(0.1)

        assert workload.call(f"exchange {sidecar_port} 65536")["exact"]
        answer = workload.call(f"connect {vip.port} 200")
        assert set(answer["names"]) == {"v1", "v2"} and answer["failed"] == 0

        found = samples(metrics_port)
        assert found[("meshlet_accel_redirected_bytes_total", ())] == 2 * 65536
        assert found[("meshlet_accel_sockets", ())] == 0
        for name in ("v1", "v2"):
            labels = (("backend", name), ("route", "canary"))
            assert found[("meshlet_kernel_connections_total", labels)] == answer["names"][name]

        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=60) == 0, log.read_text()
        assert attached(cgroup, CGROUP_SOCK_OPS) == attached(cgroup, CGROUP_INET4_CONNECT) == ()
        assert not pin_root.exists() or list(pin_root.iterdir()) == []
        assert workload.call(f"connect {vip.port} 5")["names"] == {"vip": 5}
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(timeout=30)
