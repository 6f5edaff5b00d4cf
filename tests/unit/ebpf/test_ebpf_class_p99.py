"""The loop's input: p99 RTT of each SLO'd class over one interval, from two map snapshots."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshlet.ebpf import hist
from meshlet.ebpf.agent import class_p99, policy_ports
from meshlet.policy import load_file, load_text
from meshlet.telemetry.node import TcpHistogram, TcpSnapshot

POLICY = load_text("""
apiVersion: meshlet.dev/v1alpha1
kind: QoSPolicy
metadata: {name: node}
spec:
  interface: eth0
  classes:
    latency: {priority: 0, rate: 50mbit, ceil: 100mbit, slo: {p99: 50ms}, ports: [9081, 9082]}
    bulk:    {priority: 2, rate: 10mbit, ceil: 100mbit, ports: [9000]}
""")


def srtt(port: int, direction: str, values_us: list[int]) -> TcpHistogram:
    counts = [0] * hist.SLOTS
    for v in values_us:
        counts[hist.slot_of(v)] += 1
    return TcpHistogram("srtt", port, direction, tuple(counts), sum(values_us) / 1e6)


def test_only_the_interval_counts_and_every_port_and_direction_of_the_class_is_pooled():
    before = TcpSnapshot((srtt(9081, "out", [200_000] * 100),))  # old, slow samples: not this interval
    after = TcpSnapshot((
        srtt(9081, "out", [200_000] * 100 + [1_000] * 60),
        srtt(9082, "in", [1_000] * 39 + [80_000]),
        srtt(9000, "out", [900_000] * 50),  # bulk's port: not the latency class
    ))
    p99 = class_p99(POLICY.qos[0], before, after)
    assert set(p99) == {"latency"}
    assert p99["latency"] == pytest.approx(1.0e-3, rel=0.125)  # the one 80 ms sample is only the top 1%


def test_no_samples_in_the_interval_is_no_information():
    same = TcpSnapshot((srtt(9081, "out", [1_000] * 10),))
    assert class_p99(POLICY.qos[0], same, same) == {"latency": None}


def test_observed_ports_come_from_qos_classes_backends_and_flags():
    traffic = load_file(str(Path(__file__).parents[3] / "policies" / "canary.yaml")).traffic
    ports = policy_ports(POLICY.qos, traffic, [8080])
    assert {9081, 9082, 9000, 8080} <= ports
    assert {b.address.port for p in traffic for b in p.backends} <= ports


def test_a_class_that_selects_pods_pools_its_workloads_on_any_port():
    """The agent tags a Pod's sockets with the class its labels chose (the class, not the port,
    is what the loop steers); other workloads, and other classes' Pods, stay out."""
    policy = load_text("""
apiVersion: meshlet.dev/v1alpha1
kind: QoSPolicy
metadata: {name: node}
spec:
  interface: eth0
  classes:
    latency: {priority: 0, rate: 5mbit, slo: {p99: 50ms}, podSelector: {matchLabels: {tier: web}}}
    bulk:    {priority: 2, rate: 1mbit, podSelector: {matchLabels: {tier: batch}}}
""").qos[0]

    def tagged(workload: str, qos_class: str, values_us: list[int]) -> TcpHistogram:
        plain = srtt(0, "out", values_us)
        return TcpHistogram("srtt", 0, "out", plain.counts, plain.sum_seconds, "shop", workload, qos_class)

    after = TcpSnapshot((tagged("web", "latency", [2_000] * 99), tagged("etl", "bulk", [900_000] * 500),
                         tagged("misc", "", [700_000] * 50)))
    p99 = class_p99(policy, TcpSnapshot(), after)
    assert p99["latency"] == pytest.approx(2.0e-3, rel=0.125)
