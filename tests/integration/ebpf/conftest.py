"""Fixtures for the node agent's kernel tests: real programs, network namespaces made and
always deleted here. Skips only name the missing capability; CI runs as root and has them all."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from ebpf_support import ip

from meshlet.ebpf import capability

MISSING = capability.missing(capability.probe())


@pytest.fixture(autouse=True)
def _agent_capabilities() -> None:
    if MISSING:
        pytest.skip(f"needs the node agent's capabilities: {MISSING}")


@dataclass(frozen=True)
class VethPair:
    """Two namespaces joined by a veth: `left` (10.x.0.1 on `left_if`) and `right` (10.x.0.2)."""

    left: str
    right: str
    left_if: str
    right_if: str
    left_ip: str
    right_ip: str


@pytest.fixture
def veth_pair() -> Iterator[VethPair]:
    tag = uuid.uuid4().hex[:6]
    subnet = int(tag[:2], 16)
    pair = VethPair(f"mla-{tag}", f"mlb-{tag}", f"va{tag}", f"vb{tag}", f"10.{subnet}.77.1", f"10.{subnet}.77.2")
    try:
        ip("netns", "add", pair.left)
        ip("netns", "add", pair.right)
        ip(
            "-n",
            pair.left,
            "link",
            "add",
            pair.left_if,
            "type",
            "veth",
            "peer",
            "name",
            pair.right_if,
            "netns",
            pair.right,
        )
        for ns, ifname, addr in ((pair.left, pair.left_if, pair.left_ip), (pair.right, pair.right_if, pair.right_ip)):
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", ifname)
            ip("-n", ns, "link", "set", ifname, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield pair
    finally:
        for ns in (pair.left, pair.right):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


@pytest.fixture
def pin_dir() -> Iterator[Path]:
    """A private bpffs directory for one agent's pins, removed even if the agent left some."""
    base = Path(f"/sys/fs/bpf/meshlet-test-{uuid.uuid4().hex[:8]}")
    try:
        yield base / "agent"
    finally:
        shutil.rmtree(base, ignore_errors=True)


@dataclass(frozen=True)
class RoutedPath:
    """left --(left_if)--> mid --(mid_out, a token bucket: the bottleneck)--> right."""

    left: str
    mid: str
    right: str
    left_if: str
    mid_out: str
    left_ip: str
    right_ip: str


@pytest.fixture
def routed_path() -> Iterator[RoutedPath]:
    tag = uuid.uuid4().hex[:6]
    net = f"10.{int(tag[:2], 16)}.{int(tag[2:4], 16) % 100 + 100}"
    path = RoutedPath(f"mll-{tag}", f"mlm-{tag}", f"mlr-{tag}", f"la{tag}", f"mo{tag}", f"{net}.1", f"{net}.130")
    links = (
        (path.left, path.left_if, f"{net}.1/26", path.mid, f"mi{tag}", f"{net}.2/26"),
        (path.mid, path.mid_out, f"{net}.129/26", path.right, f"ri{tag}", f"{net}.130/26"),
    )
    try:
        for ns in (path.left, path.mid, path.right):
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
        for ns_a, if_a, addr_a, ns_b, if_b, addr_b in links:
            ip("-n", ns_a, "link", "add", if_a, "type", "veth", "peer", "name", if_b, "netns", ns_b)
            for ns, ifname, addr in ((ns_a, if_a, addr_a), (ns_b, if_b, addr_b)):
                ip("-n", ns, "addr", "add", addr, "dev", ifname)
                ip("-n", ns, "link", "set", ifname, "up")
        ip("-n", path.left, "route", "add", "default", "via", f"{net}.2")
        ip("-n", path.right, "route", "add", "default", "via", f"{net}.129")
        ip("netns", "exec", path.mid, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        yield path
    finally:
        for ns in (path.left, path.mid, path.right):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
