"""connect4 split on a real cgroup: weights, getpeername, changes under load, and isolation."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from meshlet.ebpf.cgroup import Cgroup
from meshlet.ebpf.kernel_split import KernelSplit, KernelSplitter, SplitBackend
from meshlet.policy.model import Address

pytestmark = pytest.mark.root


def split(vip_port: int, *backends: tuple[str, int, int]) -> KernelSplit:
    return KernelSplit(
        "reviews",
        Address("127.0.0.1", vip_port),
        tuple(SplitBackend("canary", name, Address("127.0.0.1", port), weight) for name, port, weight in backends),
    )


@pytest.fixture
def splitter(cgroup: Cgroup, pin_root) -> Iterator[KernelSplitter]:
    s = KernelSplitter(pin_root / "split")
    try:
        s.start()
        assert s.set_targets({cgroup.path: 0}) == {}
        yield s
    finally:
        s.stop()


@pytest.fixture
def services(greeters):
    """Two backends and a listener on the VIP itself: reaching it means nothing rewrote the connect."""
    return greeters("v1"), greeters("v2"), greeters("vip")


def test_5000_connections_follow_90_10_within_2_points(splitter, services, cgroup, workloads):
    v1, v2, vip = services
    splitter.apply([split(vip.port, ("v1", v1.port, 90), ("v2", v2.port, 10))])
    answer = workloads(cgroup).call(f"connect {vip.port} 5000", timeout=240)
    assert answer["failed"] == 0
    assert set(answer["names"]) <= {"v1", "v2"}
    assert abs(answer["names"]["v2"] / 5000 * 100 - 10) <= 2
    assert splitter.connections() == {
        ("default", "canary", "v1"): answer["names"]["v1"], ("default", "canary", "v2"): answer["names"]["v2"]}


def test_getpeername_shows_the_virtual_address(splitter, services, cgroup, workloads):
    v1, _, vip = services
    splitter.apply([split(vip.port, ("v1", v1.port, 100))])
    workload = workloads(cgroup)
    held = workload.call(f"open {vip.port}")
    assert held["peer"] == ["127.0.0.1", vip.port]
    assert workload.call(f"ask {held['id']}")["name"] == "v1"  # ...while the bytes go to v1


def test_new_weights_apply_to_new_connections_only(splitter, services, cgroup, workloads):
    v1, v2, vip = services
    workload = workloads(cgroup)
    splitter.apply([split(vip.port, ("v1", v1.port, 100), ("v2", v2.port, 0))])
    old = workload.call(f"open {vip.port}")
    splitter.apply([split(vip.port, ("v1", v1.port, 0), ("v2", v2.port, 100))])
    new = workload.call(f"open {vip.port}")
    assert workload.call(f"ask {old['id']}")["name"] == "v1"
    assert workload.call(f"ask {new['id']}")["name"] == "v2"
    assert workload.call(f"ask {old['id']}")["name"] == "v1"


def test_weight_changes_under_load_lose_no_connection(splitter, services, cgroup, workloads):
    v1, v2, vip = services
    splitter.apply([split(vip.port, ("v1", v1.port, 50), ("v2", v2.port, 50))])
    result: dict = {}
    load = threading.Thread(target=lambda: result.update(workloads(cgroup).call(f"connect {vip.port} 3000", 240)))
    load.start()
    deadline = time.monotonic() + 120
    for step in range(10):
        # Each change lands while connections are flowing: after another ~250 were accepted.
        while v1.accepted + v2.accepted < 250 * (step + 1) and load.is_alive() and time.monotonic() < deadline:
            time.sleep(0.005)
        weight = 10 * (step + 1) - 5
        splitter.apply([split(vip.port, ("v1", v1.port, weight), ("v2", v2.port, 100 - weight))])
    load.join(timeout=250)
    assert v1.accepted + v2.accepted >= 2500 and not load.is_alive()
    assert result["failed"] == 0
    assert sum(result["names"].values()) == 3000
    assert set(result["names"]) <= {"v1", "v2"}  # every connection reached a live backend


def test_process_outside_the_cgroup_is_untouched(splitter, services, workloads):
    v1, _, vip = services
    splitter.apply([split(vip.port, ("v1", v1.port, 100))])
    answer = workloads().call(f"connect {vip.port} 50")
    assert answer["names"] == {"vip": 50}
    assert answer["peers"] == [["127.0.0.1", vip.port]]


def test_removing_the_split_restores_plain_connects(splitter, services, cgroup, workloads):
    v1, _, vip = services
    workload = workloads(cgroup)
    splitter.apply([split(vip.port, ("v1", v1.port, 100))])
    assert workload.call(f"connect {vip.port} 20")["names"] == {"v1": 20}
    splitter.apply([])
    assert workload.call(f"connect {vip.port} 20")["names"] == {"vip": 20}
