"""The dashboard's node-agent panels against a real Prometheus scraping a real `meshlet agent`.

The agent runs in a namespace (as every agent test here), shaping its veth by a QoSPolicy
whose latency class has a 1 µs p99 SLO: any measured RTT breaches it, so the AIMD loop cuts
the lower classes and `meshlet_qos_adjustments_total` has data. Prometheus runs in the same
namespace (the agent's metrics port is there), scraping it every second. Each panel's PromQL
is sent as Grafana sends it (tests/integration/telemetry/dashboard_support.py).
"""

from __future__ import annotations

import math
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
from ebpf_support import Agent, Pinger, echo, inside

sys.path.insert(0, str(Path(__file__).parents[1] / "telemetry"))

from dashboard_support import load, run
from prometheus_support import PROMETHEUS, Prometheus

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(PROMETHEUS is None, reason="needs Debian's prometheus (scripts/setup installs it)"),
]
AGENT_ROW = "Node agent"
POLICY = """
apiVersion: meshlet.dev/v1alpha1
kind: QoSPolicy
metadata: {{name: dashboard}}
spec:
  interface: {interface}
  classes:
    latency: {{priority: 0, rate: 2mbit, ceil: 100mbit, slo: {{p99: 0.001ms}}, ports: [{latency_port}]}}
    default: {{priority: 1, rate: 1mbit, ceil: 100mbit}}
    bulk:    {{priority: 2, rate: 1mbit, ceil: 100mbit, ports: [{bulk_port}]}}
"""


def accept_and_close(server: socket.socket) -> None:
    try:
        while True:
            server.accept()[0].close()
    except OSError:
        pass


def connect(netns: str, address: tuple[str, int], times: int = 5) -> None:
    for _ in range(times):
        with inside(netns):
            client = socket.create_connection(address, timeout=5)
        client.close()


def finite(series: list[dict]) -> bool:
    return any(math.isfinite(float(value)) for s in series for _, value in s["values"])


def test_agent_panels_run_and_show_tcp_percentiles_and_qos_adjustments(veth_pair, tmp_path, pin_dir):
    pair = veth_pair
    with inside(pair.right):
        echo_server = socket.create_server((pair.right_ip, 0))
        connect_server = socket.create_server((pair.right_ip, 0))
    latency_port, connect_port = echo_server.getsockname()[1], connect_server.getsockname()[1]
    policy = tmp_path / "qos.yaml"
    # Both servers' ports are the latency class's: connects to one, round trips on the other.
    policy.write_text(POLICY.format(interface=pair.left_if, latency_port=f"{latency_port}, {connect_port}",
                                    bulk_port=connect_port + 1))
    threading.Thread(target=echo, args=(echo_server,), daemon=True).start()
    threading.Thread(target=accept_and_close, args=(connect_server,), daemon=True).start()
    agent = Agent(pair.left, policy, pin_dir, tmp_path / "agent.log", interval="200ms")
    prometheus = Prometheus(tmp_path / "prometheus", [{"job_name": "meshlet-agent",
                                                      "static_configs": [{"targets": ["127.0.0.1:15090"]}]}],
                            prefix=["nsenter", f"--net=/run/netns/{pair.left}"])
    pinger = None
    try:
        agent.wait_ready()
        with inside(pair.left):
            prometheus.wait_ready()
        start = time.time()
        pinger = Pinger(pair.left, (pair.right_ip, latency_port))
        connect(pair.left, (pair.right_ip, connect_port))
        with inside(pair.left):
            prometheus.wait_for('sum(meshlet_qos_adjustments_total{direction="down"}) > 0', bool,
                                "the agent's first cut to be scraped", timeout=30)
        connect(pair.left, (pair.right_ip, connect_port))  # a rise of the histogram Prometheus already holds
        time.sleep(3)  # a few more scrapes of the cut counters and the histograms
        with inside(pair.left):
            results = run(prometheus, load(), start, time.time())
    finally:
        if pinger:
            pinger.stop()
        prometheus.stop()
        agent.kill()
        echo_server.close()
        connect_server.close()

    agent_targets = {t: series for t, series in results.items() if t.row.startswith(AGENT_ROW)}
    assert len(agent_targets) == 8
    no_data = [str(t) for t, series in agent_targets.items() if not finite(series)]
    assert not no_data, f"no finite value: {no_data}"
    ports = {s["metric"]["port"] for t, series in agent_targets.items() if "connect latency" in t.panel for s in series}
    assert str(connect_port) in ports, ports
    cuts = {(s["metric"]["class"], s["metric"]["direction"])
            for t, series in agent_targets.items() if t.panel == "QoS adjustments" for s in series}
    assert ("bulk", "down") in cuts, cuts
