"""`meshlet agent --accelerate --kernel-vip` as a real process: both accelerations work, their
metrics are exported, and SIGTERM removes every hook and pin."""

from __future__ import annotations

import signal

import pytest
from agent_support import CGROUP_INET4_CONNECT, CGROUP_SOCK_OPS, POLICY, attached, free_port, samples

pytestmark = pytest.mark.root


def test_agent_runs_both_accelerations_exports_them_and_removes_them_on_sigterm(
    cgroup, pin_root, workloads, greeters, tmp_path, run_agent
):
    workload = workloads(cgroup)
    sidecar_port = workload.call("listen")["port"]
    v1, v2, vip = greeters("v1"), greeters("v2"), greeters("vip")
    policy = tmp_path / "reviews.yaml"
    policy.write_text(POLICY.format(v1=v1.port, v2=v2.port))
    metrics_port = free_port()
    argv = ["--pin-dir", str(pin_root / "agent"), "--metrics", f"127.0.0.1:{metrics_port}"]
    argv += ["--accelerate", "--cgroup", str(cgroup.path), "--sidecar-ports", str(sidecar_port)]
    argv += ["--policy", str(policy), "--kernel-vip", f"reviews=127.0.0.1:{vip.port}"]
    agent = run_agent(argv)

    assert workload.call(f"exchange {sidecar_port} 65536")["exact"]
    answer = workload.call(f"connect {vip.port} 200")
    assert set(answer["names"]) == {"v1", "v2"} and answer["failed"] == 0

    found = samples(metrics_port)
    assert found[("meshlet_accel_redirected_bytes_total", ())] == 2 * 65536
    assert found[("meshlet_accel_sockets", ())] == 0
    for name in ("v1", "v2"):
        labels = (("backend", name), ("namespace", "default"), ("route", "canary"))
        assert found[("meshlet_kernel_connections_total", labels)] == answer["names"][name]

    agent.process.send_signal(signal.SIGTERM)
    assert agent.process.wait(timeout=60) == 0, agent.text()
    assert attached(cgroup, CGROUP_SOCK_OPS) == attached(cgroup, CGROUP_INET4_CONNECT) == ()
    assert not pin_root.exists() or list(pin_root.iterdir()) == []
    assert workload.call(f"connect {vip.port} 5")["names"] == {"vip": 5}
