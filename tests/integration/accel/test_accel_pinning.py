"""Pinned hooks under a pin root: they outlive kill -9, a restart adopts them, stop removes them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from meshlet.ebpf import bpfsys, pins
from meshlet.ebpf.accel import SockmapAccelerator
from meshlet.ebpf.cgroup import Cgroup
from meshlet.ebpf.kernel_split import KernelSplitter

pytestmark = pytest.mark.root

STANDIN = Path(__file__).with_name("standin_agent.py")
CGROUP_SOCK_OPS, CGROUP_INET4_CONNECT, CGROUP_INET4_GETPEERNAME = 3, 10, 29


def attached(cgroup: Cgroup, attach_type: int) -> tuple[int, ...]:
    with cgroup.fd() as fd:
        return bpfsys.attached_ids(fd, attach_type)


@pytest.fixture
def standin(cgroup, pin_root):
    processes: list[subprocess.Popen] = []

    def start(*ports: int) -> tuple[subprocess.Popen, dict]:
        argv = [sys.executable, str(STANDIN), str(cgroup.path), str(pin_root), *map(str, ports)]
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        processes.append(process)
        line = process.stdout.readline()  # the stand-in prints once attached (or exits on error)
        assert line, f"stand-in agent exited with {process.wait(timeout=10)}"
        return process, json.loads(line)

    try:
        yield start
    finally:
        for process in processes:
            process.kill()
            process.wait(timeout=10)
            process.stdout.close()


def test_kill_9_leaves_working_hooks_and_a_restart_adopts_them(cgroup, pin_root, standin, workloads, greeters):
    workload = workloads(cgroup)
    sidecar_port = workload.call("listen")["port"]
    v1, vip = greeters("v1"), greeters("vip")
    process, old = standin(sidecar_port, vip.port, v1.port)
    held = workload.call(f"open {sidecar_port}")  # accelerated, and must survive all that follows

    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
    assert attached(cgroup, CGROUP_SOCK_OPS) == (old["sockops"],)
    assert attached(cgroup, CGROUP_INET4_CONNECT) == (old["connect4"],)
    assert workload.call(f"connect {vip.port} 10")["names"] == {"v1": 10}  # the data plane runs agentless
    assert workload.call(f"exchange {sidecar_port} 65536")["exact"]

    accel = SockmapAccelerator(ports={sidecar_port}, pin_dir=pin_root / "accel")
    splitter = KernelSplitter(pin_root / "split")
    try:
        accel.start()
        accel.set_targets([cgroup.path])
        splitter.start()
        splitter.set_targets({cgroup.path: 0})
        assert accel.hooks.adopted and splitter.hooks.adopted
        assert attached(cgroup, CGROUP_SOCK_OPS) == (accel.hooks.prog_id("meshlet_sockops"),)
        assert attached(cgroup, CGROUP_INET4_CONNECT) == (splitter.hooks.prog_id("meshlet_connect4"),)
        assert attached(cgroup, CGROUP_INET4_GETPEERNAME) == (splitter.hooks.prog_id("meshlet_getpeername4"),)
        stats = accel.stats()
        assert stats.redirected_bytes >= 2 * 65536  # counted by the dead agent's maps, adopted
        assert stats.sockets == 2  # the held pair is still in the adopted sockhash
        assert workload.call(f"ask {held['id']}")["name"] == "?"
        assert accel.stats().redirected_bytes == stats.redirected_bytes + 4
        assert workload.call(f"connect {vip.port} 10")["names"] == {"v1": 10}  # adopted weights
        workload.call(f"close {held['id']}")
    finally:
        left = accel.stop()
        splitter.stop()
    assert left == 0
    assert attached(cgroup, CGROUP_SOCK_OPS) == ()
    assert attached(cgroup, CGROUP_INET4_CONNECT) == attached(cgroup, CGROUP_INET4_GETPEERNAME) == ()
    assert not pin_root.exists() or not any(pin_root.iterdir())
    assert workload.call(f"connect {vip.port} 5")["names"] == {"vip": 5}


def test_stop_keeps_the_maps_of_live_sockets_until_a_later_stop(cgroup, pin_root, workloads):
    workload = workloads(cgroup)
    port = workload.call("listen")["port"]
    accel = SockmapAccelerator(ports={port}, pin_dir=pin_root / "accel")
    try:
        accel.start()
        accel.set_targets([cgroup.path])
        held = workload.call(f"open {port}")
    finally:
        left = accel.stop(drain=0.2)
    assert left == 2
    assert attached(cgroup, CGROUP_SOCK_OPS) == ()
    assert sorted(p.name for p in accel.hooks.pin_dir.iterdir()) == sorted(accel.hooks.spec.maps)
    assert workload.call(f"ask {held['id']}")["name"] == "?"  # still redirected, nothing lost

    workload.call(f"close {held['id']}")
    again = SockmapAccelerator(ports={port}, pin_dir=pin_root / "accel")
    try:
        again.start()
        again.set_targets([cgroup.path])
        assert again.hooks.adopted
    finally:
        assert again.stop() == 0
    assert not again.hooks.pin_dir.exists()


def test_pins_that_do_not_fit_the_program_are_replaced_not_fatal(cgroup, pin_root, workloads):
    workload = workloads(cgroup)
    port = workload.call("listen")["port"]
    first = SockmapAccelerator(ports={port}, pin_dir=pin_root / "accel")
    first.start()
    first.set_targets([cgroup.path])
    try:
        pin_dir = first.hooks.pin_dir
        # Another version's leftovers: a map of the wrong type where the sockhash should be.
        (pin_dir / "meshlet_socks").unlink()
        pins.pin(first.hooks.map_fd("meshlet_stats"), "meshlet_socks", pin_dir)
    finally:
        first.hooks.detach_all()
        first.hooks.close(keep_maps=True)
    second = SockmapAccelerator(ports={port}, pin_dir=pin_root / "accel")
    try:
        second.start()
        second.set_targets([cgroup.path])
        assert not second.hooks.adopted
        assert workload.call(f"exchange {port} 1000")["exact"]
        assert second.stats().redirected_bytes == 2000
    finally:
        second.stop()
    assert not pin_dir.exists()
