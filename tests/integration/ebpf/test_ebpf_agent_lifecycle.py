"""`meshlet agent` as a real process in a namespace: what it attaches, what SIGTERM removes,
what a restart after `kill -9` reconciles, `meshlet stats` against it, and the one-line refusal
when run unprivileged."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from ebpf_support import MESHLET, Agent, inside
from pyroute2 import IPRoute

from meshlet.ebpf import tc
from meshlet.ebpf.htb import changes, tree_for
from meshlet.policy import load_file

pytestmark = pytest.mark.root
REPO = Path(__file__).parents[3]
PINS = ["classes", "hist", "pods", "ports", "workloads"]


@pytest.fixture
def setup(veth_pair, tmp_path, pin_dir):
    latency_port, bulk_port = 20000 + os.getpid() % 20000, 40000 + os.getpid() % 20000
    policy = tmp_path / "qos.yaml"
    policy.write_text(
        (REPO / "policies" / "qos.yaml")
        .read_text()
        .replace("interface: eth0", f"interface: {veth_pair.left_if}")
        .replace("[9081, 9082]", f"[{latency_port}]")
        .replace("[9000]", f"[{bulk_port}]")
    )
    return veth_pair, policy, pin_dir, latency_port


def kernel_state(netns: str, ifname: str):
    with IPRoute(netns=netns) as ipr:
        index = ipr.link_lookup(ifname=ifname)[0]
        return tc.read_tree(ipr, index), tc.egress_filters(ipr, index)


def test_sigterm_removes_everything_attached(setup, tmp_path):
    pair, policy, pin_dir, latency_port = setup
    agent = Agent(pair.left, policy, pin_dir, tmp_path / "agent.log")
    try:
        agent.wait_ready()
        tree, filters = kernel_state(pair.left, pair.left_if)
        assert tree is not None and changes(tree_for(load_file(str(policy)).qos[0]), tree) == []
        assert filters == [tc.FILTER_NAME]
        assert sorted(p.name for p in pin_dir.iterdir()) == PINS

        # Traffic on the latency port inside the namespace shows up in `meshlet stats`.
        with inside(pair.left):
            server = socket.create_server(("127.0.0.1", latency_port))
        with server:
            for _ in range(3):
                with inside(pair.left):
                    client = socket.create_connection(("127.0.0.1", latency_port), timeout=5)
                client.close()
                server.accept()[0].close()
        stats = subprocess.run(
            ["nsenter", f"--net=/run/netns/{pair.left}", str(MESHLET), "stats", "--once"],
            capture_output=True, text=True, timeout=60,
        )
        assert stats.returncode == 0, stats.stderr
        row = next(line.split() for line in stats.stdout.splitlines() if line.split()[:3] == [str(latency_port), "out", "connect"])
        assert row[3] == "3" and row[4].endswith(("us", "ms"))

        assert agent.stop(signal.SIGTERM) == 0
        assert kernel_state(pair.left, pair.left_if) == (None, [])
        assert not pin_dir.exists()
    finally:
        agent.kill()


def test_restart_after_kill_9_reconciles_without_duplicates(setup, tmp_path):
    pair, policy, pin_dir, _ = setup
    first = Agent(pair.left, policy, pin_dir, tmp_path / "first.log")
    second = None
    try:
        first.wait_ready()
        first.stop(signal.SIGKILL)
        tree, filters = kernel_state(pair.left, pair.left_if)
        assert tree is not None and filters == [tc.FILTER_NAME]  # a crash leaves them behind
        assert pin_dir.is_dir()

        # Restart with one class changed: the leftover tree is reconciled, not rebuilt.
        policy.write_text(policy.read_text().replace("rate: 10mbit", "rate: 20mbit"))
        second = Agent(pair.left, policy, pin_dir, tmp_path / "second.log")
        second.wait_ready()
        tree, filters = kernel_state(pair.left, pair.left_if)
        assert filters == [tc.FILTER_NAME]
        assert changes(tree_for(load_file(str(policy)).qos[0]), tree) == []
        qos_lines = [line.split(" ", 2)[2] for line in (tmp_path / "second.log").read_text().splitlines() if " qos: " in line]
        assert qos_lines == [f"qos: change class 1:12 bulk rate 20000000bit ceil 100000000bit prio 2 on {pair.left_if}"]
        assert sorted(p.name for p in pin_dir.iterdir()) == PINS
        assert second.stop(signal.SIGTERM) == 0
        assert kernel_state(pair.left, pair.left_if) == (None, [])
    finally:
        first.kill()
        if second is not None:
            second.kill()


def test_unprivileged_agent_exits_1_with_one_line_naming_root():
    result = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
         str(MESHLET), "agent", "--ports", "8080"],
        capture_output=True, text=True, timeout=60, cwd="/",
    )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "meshlet: agent: needs root (CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON): run as root or as a privileged DaemonSet"
    ]


def test_runtime_refusals_are_one_line_and_leave_nothing(setup, tmp_path):
    pair, policy, pin_dir, _ = setup
    policy.write_text(policy.read_text().replace(f"interface: {pair.left_if}", "interface: nosuch0"))
    base = ["nsenter", f"--net=/run/netns/{pair.left}", str(MESHLET), "agent", "--metrics", "127.0.0.1:15090"]
    missing_if = subprocess.run([*base, "--policy", str(policy), "--pin-dir", str(pin_dir)],
                                capture_output=True, text=True, timeout=60)
    assert missing_if.returncode == 1
    assert missing_if.stderr.splitlines()[-1] == "meshlet: agent: interface nosuch0 not found (QoSPolicy node-default)"
    assert "Traceback" not in missing_if.stderr
    assert not pin_dir.exists()

    not_bpffs = subprocess.run([*base, "--ports", "8080", "--pin-dir", str(tmp_path / "pins")],
                               capture_output=True, text=True, timeout=60)
    assert not_bpffs.returncode == 1
    assert not_bpffs.stderr.splitlines()[-1].startswith("meshlet: agent: cannot pin BPF map at ")
    assert "Traceback" not in not_bpffs.stderr


def test_a_qos_policy_edit_applies_while_running_and_a_bad_one_is_refused(setup, tmp_path):
    pair, policy, pin_dir, _ = setup
    agent = Agent(pair.left, policy, pin_dir, tmp_path / "agent.log")
    try:
        agent.wait_ready()
        policy.write_text(policy.read_text().replace("rate: 10mbit", "rate: 20mbit"))
        deadline = time.monotonic() + 30
        change = f"qos: change class 1:12 bulk rate 20000000bit ceil 100000000bit prio 2 on {pair.left_if}"
        while change not in agent.log.read_text():
            assert time.monotonic() < deadline, agent.log.read_text()
            time.sleep(0.1)
        tree, filters = kernel_state(pair.left, pair.left_if)
        assert changes(tree_for(load_file(str(policy)).qos[0]), tree) == [] and filters == [tc.FILTER_NAME]

        policy.write_text(policy.read_text().replace("rate: 20mbit", "rate: fast"))
        while "agent: policy not reloaded, keeping the running state: " not in agent.log.read_text():
            assert time.monotonic() < deadline + 30, agent.log.read_text()
            time.sleep(0.1)
        assert kernel_state(pair.left, pair.left_if) == (tree, filters)
        assert agent.stop(signal.SIGTERM) == 0
        assert kernel_state(pair.left, pair.left_if) == (None, [])
    finally:
        agent.kill()
