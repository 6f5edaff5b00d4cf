"""The HTB tree a QoSPolicy asks for and the minimal change list (pure, no kernel)."""

from __future__ import annotations

from dataclasses import replace

from meshlet.ebpf.htb import Change, HtbTree, changes, port_classes, tree_for, with_ceil
from meshlet.policy import load_text

POLICY = """
apiVersion: meshlet.dev/v1alpha1
kind: QoSPolicy
metadata: {name: node}
spec:
  interface: eth0
  classes:
    bulk:    {priority: 2, rate: 10mbit, ceil: 100mbit, ports: [9000]}
    latency: {priority: 0, rate: 50mbit, ceil: 100mbit, slo: {p99: 50ms}, ports: [9081, 9082]}
    default: {priority: 1, rate: 30mbit, ceil: 100mbit}
"""


def qos(text: str = POLICY):
    return load_text(text).qos[0]


def test_leaves_follow_priority_and_unclassified_traffic_goes_to_default():
    tree = tree_for(qos())
    parent, *leaves = tree.classes
    assert (parent.classid, parent.rate, parent.ceil) == (0x10001, 12_500_000, 12_500_000)
    assert [(c.name, c.classid, c.rate, c.ceil, c.prio) for c in leaves] == [
        ("latency", 0x10010, 6_250_000, 12_500_000, 0),
        ("default", 0x10011, 3_750_000, 12_500_000, 1),
        ("bulk", 0x10012, 1_250_000, 12_500_000, 2),
    ]
    assert tree.default == 0x11
    assert port_classes(qos(), tree) == {9081: 0x10010, 9082: 0x10010, 9000: 0x10012}


def test_without_a_default_class_the_lowest_priority_takes_unclassified_traffic():
    tree = tree_for(qos(POLICY.replace("    default: {priority: 1, rate: 30mbit, ceil: 100mbit}\n", "")))
    assert tree.default == 0x11 and tree.named("bulk").classid == 0x10011


def test_nothing_there_means_create_the_root_then_every_class():
    tree = tree_for(qos())
    todo = changes(tree, None)
    assert [c.op for c in todo] == ["create-root", "add", "add", "add", "add"]
    assert todo[0].default == 0x11


def test_reapplying_the_same_policy_changes_nothing():
    tree = tree_for(qos())
    observed = HtbTree(tree.default, tuple(replace(c, name="") for c in tree.classes))  # the kernel keeps no names
    assert changes(tree, observed) == []


def test_only_what_differs_is_changed():
    old = tree_for(qos())
    new = tree_for(qos(POLICY.replace("rate: 10mbit", "rate: 20mbit")))
    (change,) = changes(new, old)
    assert change.op == "change" and change.htb_class is not None
    assert (change.htb_class.name, change.htb_class.rate) == ("bulk", 2_500_000)


def test_a_removed_class_is_deleted_and_the_default_moves():
    old = tree_for(qos())
    new = tree_for(qos(POLICY.replace("    bulk:    {priority: 2, rate: 10mbit, ceil: 100mbit, ports: [9000]}\n", "")))
    todo = changes(new, old)
    assert [c.op for c in todo] == ["delete"] and todo[0].htb_class.classid == 0x10012
    assert new.default == 0x11


def test_a_new_default_class_rebuilds_the_root_htb_cannot_change_it_in_place():
    old = tree_for(qos())
    new = tree_for(qos(POLICY.replace("priority: 1", "priority: 3")))
    ops = changes(new, old)
    assert ops[0] == Change("create-root", default=0x12)
    assert [c.op for c in ops[1:]] == ["add"] * 4


def test_with_ceil_changes_one_class_only():
    tree = tree_for(qos())
    cut = with_ceil(tree, "bulk", 40_000_000)
    (change,) = changes(cut, tree)
    assert change.op == "change" and change.htb_class.ceil == 5_000_000
    assert str(change) == "change class 1:12 bulk rate 10000000bit ceil 40000000bit prio 2"
