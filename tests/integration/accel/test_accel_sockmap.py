"""Sockmap redirect on a real cgroup: byte-exact data, the counter, and what is left alone."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from meshlet.ebpf.accel import SockmapAccelerator
from meshlet.ebpf.cgroup import Cgroup

pytestmark = pytest.mark.root


def wait_for_sockets(accel: SockmapAccelerator, expected: int, timeout: float = 10.0) -> int:
    """Sockets leave the map as the kernel closes them, a moment after close() returns."""
    deadline = time.monotonic() + timeout
    while (found := accel.sockets()) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


@pytest.fixture
def accel(cgroup: Cgroup, pin_root) -> Iterator[SockmapAccelerator]:
    accelerator = SockmapAccelerator(ports=(), pin_dir=pin_root / "accel")
    try:
        accelerator.start()
        assert accelerator.set_targets([cgroup.path]) == {}
        yield accelerator
    finally:
        accelerator.stop(drain=0)


@pytest.fixture
def inside(cgroup, workloads, accel):
    """A workload in the accelerated cgroup with its echo port declared a sidecar port."""
    workload = workloads(cgroup)
    port = workload.call("listen")["port"]
    accel.set_ports({port})
    return workload, port


@pytest.mark.parametrize("size", [64, 1 << 20])
def test_redirect_is_byte_exact_and_counted(accel, inside, size):
    workload, port = inside
    before = accel.stats()
    answer = workload.call(f"exchange {port} {size}")
    after = accel.stats()
    assert answer["exact"]
    assert after.redirected_bytes - before.redirected_bytes == 2 * size  # there and back
    assert after.inserted - before.inserted == 2  # the client's socket and the accepted one


def test_open_pair_is_in_the_map_and_leaves_it_on_close(accel, inside):
    workload, port = inside
    held = workload.call(f"open {port}")
    assert wait_for_sockets(accel, 2) == 2
    workload.call(f"close {held['id']}")
    assert wait_for_sockets(accel, 0) == 0


def test_no_stale_entries_after_10000_connections(accel, inside):
    workload, port = inside
    before = accel.stats()
    assert workload.call(f"churn {port} 10000", timeout=120)["done"] == 10000
    after = accel.stats()
    assert after.inserted - before.inserted == 20000
    assert after.redirected_bytes - before.redirected_bytes == 20000  # one byte each way
    assert wait_for_sockets(accel, 0) == 0


def test_port_not_declared_is_not_accelerated(accel, cgroup, workloads):
    workload = workloads(cgroup)
    port = workload.call("listen")["port"]
    accel.set_ports({port + 1 if port < 65535 else port - 1})
    before = accel.stats()
    assert workload.call(f"exchange {port} 4096")["exact"]
    after = accel.stats()
    assert (after.inserted, after.redirected_bytes) == (before.inserted, before.redirected_bytes)


def test_process_outside_the_cgroup_is_not_accelerated(accel, workloads):
    outside = workloads()
    port = outside.call("listen")["port"]
    accel.set_ports({port})
    before = accel.stats()
    assert outside.call(f"exchange {port} 4096")["exact"]
    after = accel.stats()
    assert (after.inserted, after.redirected_bytes) == (before.inserted, before.redirected_bytes)
