"""QoS on a real veth in namespaces the test creates: the HTB tree after apply and re-apply,
and the clsact classifier putting a flow's bytes into the class its port maps to."""

from __future__ import annotations

import socket
import threading

import pytest
from ebpf_support import inside
from pyroute2 import IPRoute

from meshlet.ebpf import source, tc
from meshlet.ebpf.htb import changes, port_classes, tree_for
from meshlet.ebpf.maps import fill_map
from meshlet.policy import load_text

pytestmark = pytest.mark.root

POLICY = """
apiVersion: meshlet.dev/v1alpha1
kind: QoSPolicy
metadata: {{name: test}}
spec:
  interface: {interface}
  classes:
    latency: {{priority: 0, rate: {latency_rate}, ceil: 1000mbit, slo: {{p99: 50ms}}, ports: [{latency_port}]}}
    default: {{priority: 1, rate: 100mbit, ceil: 1000mbit}}
    bulk:    {{priority: 2, rate: 50mbit, ceil: 800mbit, ports: [{bulk_port}]}}
"""


def qos(interface: str, latency_port: int = 9081, bulk_port: int = 9000, latency_rate: str = "500mbit"):
    text = POLICY.format(interface=interface, latency_port=latency_port, bulk_port=bulk_port, latency_rate=latency_rate)
    return load_text(text).qos[0]


@pytest.fixture
def left(veth_pair):
    with IPRoute(netns=veth_pair.left) as ipr:
        yield ipr, ipr.link_lookup(ifname=veth_pair.left_if)[0]


def leaves(ipr, index) -> dict[int, tuple[int, int, int]]:
    tree = tc.read_tree(ipr, index)
    assert tree is not None
    return {c.classid: (c.rate * 8, c.ceil * 8, c.prio) for c in tree.classes if c.classid != 0x10001}


def test_classes_have_the_policy_rates_and_change_after_reapply(veth_pair, left):
    ipr, index = left
    policy = qos(veth_pair.left_if)
    tc.apply(ipr, index, changes(tree_for(policy), tc.read_tree(ipr, index)))
    assert leaves(ipr, index) == {
        0x10010: (500_000_000, 1_000_000_000, 0),
        0x10011: (100_000_000, 1_000_000_000, 1),
        0x10012: (50_000_000, 800_000_000, 2),
    }
    assert tc.read_tree(ipr, index).default == 0x11
    # Idempotent: the same policy again finds nothing to do.
    assert changes(tree_for(policy), tc.read_tree(ipr, index)) == []

    changed = qos(veth_pair.left_if, latency_rate="300mbit")
    todo = changes(tree_for(changed), tc.read_tree(ipr, index))
    assert [(c.op, c.htb_class.classid) for c in todo] == [("change", 0x10010)]
    tc.apply(ipr, index, todo)
    assert leaves(ipr, index)[0x10010] == (300_000_000, 1_000_000_000, 0)
    assert leaves(ipr, index)[0x10012] == (50_000_000, 800_000_000, 2)

    # A class dropped from the policy is deleted from the kernel; the others stay untouched.
    without_bulk = load_text(POLICY.format(interface=veth_pair.left_if, latency_port=9081, bulk_port=9000,
                                           latency_rate="300mbit").replace("    bulk:", "#    bulk:")).qos[0]
    todo = changes(tree_for(without_bulk), tc.read_tree(ipr, index))
    assert [(c.op, c.htb_class.classid) for c in todo] == [("delete", 0x10012)]
    tc.apply(ipr, index, todo)
    assert set(leaves(ipr, index)) == {0x10010, 0x10011}

    # Reordered priorities move classes and the default; one apply gets the kernel there.
    reordered = load_text(POLICY.format(interface=veth_pair.left_if, latency_port=9081, bulk_port=9000,
                                        latency_rate="500mbit").replace("priority: 1", "priority: 3")).qos[0]
    tc.apply(ipr, index, changes(tree_for(reordered), tc.read_tree(ipr, index)))
    assert changes(tree_for(reordered), tc.read_tree(ipr, index)) == []
    assert tc.read_tree(ipr, index).default == 0x12
    assert leaves(ipr, index)[0x10012] == (100_000_000, 1_000_000_000, 3)

    assert tc.remove_htb(ipr, index)
    assert tc.read_tree(ipr, index) is None


def send(sock: socket.socket, payload: bytes) -> None:
    with sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)


def drain(server: socket.socket, received: list[int]) -> None:
    conn, _ = server.accept()
    with conn:
        total = 0
        while chunk := conn.recv(65536):
            total += len(chunk)
        received.append(total)


def test_a_flow_lands_in_the_class_its_port_maps_to(veth_pair, left):
    from bcc import BPF

    ipr, index = left
    with inside(veth_pair.right):
        servers = [socket.create_server((veth_pair.right_ip, 0)) for _ in range(2)]
    latency_port, bulk_port = (s.getsockname()[1] for s in servers)
    policy = qos(veth_pair.left_if, latency_port=latency_port, bulk_port=bulk_port)
    tree = tree_for(policy)
    bpf = BPF(text=source.translation_unit(source.CLASSIFIER))
    try:
        tc.apply(ipr, index, changes(tree, None))
        fill_map(bpf[b"classes"], port_classes(policy, tree))
        tc.attach_classifier(ipr, index, bpf.load_func(b"classify", BPF.SCHED_CLS).fd)
        assert tc.egress_filters(ipr, index) == [tc.FILTER_NAME]
        before = tc.class_bytes(ipr, index)

        received: list[int] = []
        threads = [threading.Thread(target=drain, args=(s, received), daemon=True) for s in servers]
        for t in threads:
            t.start()
        for port, size in ((latency_port, 300_000), (bulk_port, 100_000)):
            with inside(veth_pair.left):
                client = socket.socket()
            client.settimeout(10)
            client.connect((veth_pair.right_ip, port))
            send(client, b"x" * size)
        for t in threads:
            t.join(timeout=10)
        assert sorted(received) == [100_000, 300_000]

        after = tc.class_bytes(ipr, index)
        sent = {cls: after[cls] - before.get(cls, 0) for cls in after}
        assert sent[0x10010] >= 300_000  # payload plus headers
        assert 100_000 <= sent[0x10012] < 300_000
        assert sent[0x10011] < 10_000  # the default class saw only stray packets (ARP)
    finally:
        tc.remove_clsact(ipr, index)
        tc.remove_htb(ipr, index)
        bpf.cleanup()
        for s in servers:
            s.close()
