"""`meshlet agent --policy FILE` follows the file: weight edits reach the kernel split by map
update while connections are being opened, a bad edit keeps the running split, SIGHUP reloads
at once, and a policy that stops asking for the kernel split takes the hooks away."""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter

import pytest
from agent_support import CGROUP_INET4_CONNECT, POLICY, attached, free_port

pytestmark = pytest.mark.root

APPLIED = "agent: kernel splits now"
REFUSED = "agent: policy not reloaded, keeping the running state:"


def policy_text(v1: int, v2: int, weights: tuple[int, int], dataplane: str = "kernel") -> str:
    text = POLICY.format(v1=v1, v2=v2).replace("weight: 50}, {backend: v2, weight: 50}",
                                                f"weight: {weights[0]:3}}}, {{backend: v2, weight: {weights[1]:3}}}")
    return text.replace("dataplane: kernel", f"dataplane: {dataplane}")


class Opener:
    """Opens connections to the VIP from inside the cgroup, batch after batch, until stopped."""

    def __init__(self, workload, port: int) -> None:
        self.workload, self.port = workload, port
        self.names: Counter[str] = Counter()
        self.failed = self.batches = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            answer = self.workload.call(f"connect {self.port} 20")
            self.names.update(answer["names"])
            self.failed += answer["failed"]
            self.batches += 1

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive()


def test_agent_follows_policy_edits_under_load_and_removes_hooks(
    cgroup, pin_root, workloads, greeters, tmp_path, run_agent
):
    v1, v2, vip = greeters("v1"), greeters("v2"), greeters("vip")
    policy = tmp_path / "reviews.yaml"
    policy.write_text(policy_text(v1.port, v2.port, (100, 0)))
    agent = run_agent([
        "--pin-dir", str(pin_root / "agent"), "--metrics", f"127.0.0.1:{free_port()}", "--interval", "0.1s",
        "--cgroup", str(cgroup.path), "--policy", str(policy), "--kernel-vip", f"reviews=127.0.0.1:{vip.port}",
    ])
    agent.wait_for_log(APPLIED)  # the start-up split is logged too
    probe = workloads(cgroup)
    assert probe.call(f"connect {vip.port} 20")["names"] == {"v1": 20}

    opener = Opener(workloads(cgroup), vip.port)
    try:
        for change in range(10):  # each edit waits for the previous one to be applied
            policy.write_text(policy_text(v1.port, v2.port, (0, 100) if change % 2 == 0 else (100, 0)))
            agent.wait_for_log(APPLIED, change + 2)
            expected = "v2" if change % 2 == 0 else "v1"
            assert probe.call(f"connect {vip.port} 20")["names"] == {expected: 20}, f"after change {change}"
    finally:
        opener.finish()
    assert opener.failed == 0, "no connection lost while the weights changed"
    assert set(opener.names) == {"v1", "v2"} and opener.batches > 0, "every connection reached a live backend"

    before = Counter(probe.call(f"connect {vip.port} 10")["names"])
    policy.write_text(policy_text(v1.port, v2.port, (60, 50)))  # weights sum to 110
    agent.wait_for_log(REFUSED)
    assert f"{policy}:" in agent.text() and "weights sum to 110" in agent.text()
    assert Counter(probe.call(f"connect {vip.port} 10")["names"]) == before == Counter({"v1": 10})

    # The same size and modification time (renamed into place whole): only SIGHUP tells the agent to look.
    stamp, edited = policy.stat(), tmp_path / "edited.yaml"
    edited.write_text(policy_text(v1.port, v2.port, (0, 100)))
    os.utime(edited, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    os.replace(edited, policy)
    assert probe.call(f"connect {vip.port} 10")["names"] == {"v1": 10}
    agent.process.send_signal(signal.SIGHUP)
    agent.wait_for_log(APPLIED, 12)
    assert probe.call(f"connect {vip.port} 10")["names"] == {"v2": 10}

    assert attached(cgroup, CGROUP_INET4_CONNECT) != ()
    policy.write_text(policy_text(v1.port, v2.port, (0, 100), dataplane="proxy"))
    agent.wait_for_log("none (hooks detached)")
    assert attached(cgroup, CGROUP_INET4_CONNECT) == ()
    assert not (pin_root / "split").exists()
    assert probe.call(f"connect {vip.port} 10")["names"] == {"vip": 10}, "the VIP is no longer rewritten"

    policy.write_text(policy_text(v1.port, v2.port, (100, 0)))  # asked again: hooks come back
    agent.wait_for_log(APPLIED, 14)
    assert probe.call(f"connect {vip.port} 10")["names"] == {"v1": 10}

    agent.process.send_signal(signal.SIGTERM)
    assert agent.process.wait(timeout=60) == 0, agent.text()
    assert attached(cgroup, CGROUP_INET4_CONNECT) == ()
    assert "Traceback" not in agent.text()


def test_cgroup_without_any_split_yet_waits_for_one(cgroup, pin_root, workloads, greeters, tmp_path, run_agent):
    """`--cgroup` alone attaches nothing; the first policy that asks for a kernel split does."""
    v1, v2, vip = greeters("v1"), greeters("v2"), greeters("vip")
    policy = tmp_path / "reviews.yaml"
    policy.write_text(policy_text(v1.port, v2.port, (100, 0), dataplane="proxy"))
    agent = run_agent([
        "--pin-dir", str(pin_root / "agent"), "--metrics", f"127.0.0.1:{free_port()}", "--interval", "0.1s",
        "--cgroup", str(cgroup.path), "--policy", str(policy), "--kernel-vip", f"reviews=127.0.0.1:{vip.port}",
    ])
    assert attached(cgroup, CGROUP_INET4_CONNECT) == ()
    policy.write_text(policy_text(v1.port, v2.port, (0, 100)))
    agent.wait_for_log(APPLIED)
    assert workloads(cgroup).call(f"connect {vip.port} 10")["names"] == {"v2": 10}
    agent.process.send_signal(signal.SIGTERM)
    assert agent.process.wait(timeout=60) == 0, agent.text()
