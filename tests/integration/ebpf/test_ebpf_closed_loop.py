"""The closed loop under contention: a bulk flood through a 10 Mbit/s bottleneck drives the
latency class's RTT past its SLO; the agent cuts the bulk ceil until the SLO holds, and
restores it once the flood stops. Real TCP, real HTB and classifier, a token bucket as the link."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from ebpf_support import Agent, Flood, Pinger, echo, inside, ip, sink
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.root

MBIT = 1_000_000
POLICY = """
apiVersion: meshlet.dev/v1alpha1
kind: QoSPolicy
metadata: {{name: contention}}
spec:
  interface: {interface}
  classes:
    latency: {{priority: 0, rate: 2mbit, ceil: 100mbit, slo: {{p99: 30ms}}, ports: [{latency_port}]}}
    default: {{priority: 1, rate: 1mbit, ceil: 100mbit}}
    bulk:    {{priority: 2, rate: 1mbit, ceil: 100mbit, ports: [{bulk_port}]}}
"""


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def bulk_ceil(agent: Agent) -> float:
    return samples(agent.metrics(), "meshlet_qos_class_rate_bits")[(("class", "bulk"),)]


def cuts(agent: Agent) -> float:
    found = samples(agent.metrics(), "meshlet_qos_adjustments_total")
    return found.get((("class", "bulk"), ("direction", "down")), 0.0)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def test_loop_cuts_bulk_under_contention_then_restores(routed_path, tmp_path, pin_dir):
    path = routed_path
    slo = 0.030
    # The link: 10 Mbit/s with ~150 ms of queue (TBF; fq and netem do not exist on this kernel).
    ip("netns", "exec", path.mid, "tc", "qdisc", "add", "dev", path.mid_out, "root", "tbf",
       "rate", "10mbit", "burst", "20k", "limit", "190k")
    with inside(path.right):
        bulk_server = socket.create_server((path.right_ip, 0))
        echo_server = socket.create_server((path.right_ip, 0))
    bulk_port, latency_port = bulk_server.getsockname()[1], echo_server.getsockname()[1]
    policy = tmp_path / "qos.yaml"
    policy.write_text(POLICY.format(interface=path.left_if, latency_port=latency_port, bulk_port=bulk_port))
    threading.Thread(target=sink, args=(bulk_server,), daemon=True).start()
    threading.Thread(target=echo, args=(echo_server,), daemon=True).start()
    agent = Agent(path.left, policy, pin_dir, tmp_path / "agent.log", interval="500ms")
    flood = pinger = None
    try:
        agent.wait_ready()
        pinger = Pinger(path.left, (path.right_ip, latency_port))
        flood = Flood(path.left, (path.right_ip, bulk_port))
        wait_for(lambda: cuts(agent) >= 1, 30, "the agent to cut the bulk ceil")
        first_cut = time.monotonic()
        assert bulk_ceil(agent) < 100 * MBIT
        time.sleep(4)  # the flood goes on; the loop keeps bulk near what the link can take
        before = [rtt for at, rtt in pinger.rtts if at < first_cut]
        after = sorted(rtt for at, rtt in pinger.rtts if first_cut + 1 <= at <= first_cut + 4)
        assert max(before) > slo, "the flood should have pushed the latency class past its SLO"
        assert after and after[len(after) // 2] < slo, (after, agent.log.read_text())
        # The flood overflows the link's queue: its drops show up as retransmits of the bulk port.
        retransmits = samples(agent.metrics(), "meshlet_tcp_retransmits_total")
        bulk = (("direction", "out"), ("namespace", ""), ("port", str(bulk_port)), ("workload", ""))
        assert retransmits.get(bulk, 0) > 0, retransmits
        flood.stop()

        wait_for(lambda: bulk_ceil(agent) == 100 * MBIT, 60, "the bulk ceil to be restored after the flood")
        log = agent.log.read_text()
        assert "qos: class bulk ceil" in log and "(down: latency p99" in log and "(up: every SLO met)" in log
    finally:
        if flood:
            flood.stop()
        if pinger:
            pinger.stop()
        agent.kill()
        bulk_server.close()
        echo_server.close()
