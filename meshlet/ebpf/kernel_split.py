"""Connection-level weighted split in the kernel (bpf/connect4_split.c).

A TrafficPolicy whose one route needs nothing at L7 can be served without any proxy: the
workload's connect() to the service's virtual address (VIP) is rewritten to a backend chosen
by weight. `compile_split` is the pure part (policy → table, or an error with file:line:col);
`KernelSplitter` writes tables into the kernel, one map update per VIP, so a new set of
weights takes effect atomically, for new connections only.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshlet.ebpf.cgroup import Cgroup
from meshlet.ebpf.hooks import PIN_ROOT, CgroupHooks, Hook, HookSet
from meshlet.policy.model import Address, Mark, TrafficPolicy

MAX_VIPS = 256
MAX_BACKENDS = 16
MAX_COUNTERS = 4096
WEIGHT_TOTAL = 100

_CGROUP_SOCK_ADDR = 18  # BPFProgType
_INET4_CONNECT, _INET4_GETPEERNAME = 10, 29  # BPFAttachType

SPLIT = HookSet(
    name="split",
    source="connect4_split.c",
    hooks=(
        Hook("meshlet_connect4", _CGROUP_SOCK_ADDR, _INET4_CONNECT),
        Hook("meshlet_getpeername4", _CGROUP_SOCK_ADDR, _INET4_GETPEERNAME),
    ),
    maps=("meshlet_vips", "meshlet_conns", "meshlet_origin"),
)


class SplitError(ValueError):
    """The policy cannot be split in the kernel; the message starts with file:line:col."""


@dataclass(frozen=True, slots=True)
class SplitBackend:
    route: str
    backend: str
    address: Address  # an IPv4 literal
    weight: int


@dataclass(frozen=True, slots=True)
class KernelSplit:
    """What one VIP's map value holds: the backends of the policy's route, with weights."""

    policy: str
    vip: Address
    backends: tuple[SplitBackend, ...]


def ineligible(policy: TrafficPolicy) -> tuple[Mark, str] | None:
    """Why the policy needs the proxy (where, and a reason naming the feature), or None if the kernel can serve it."""
    if len(policy.routes) != 1:
        return policy.mark, f"{len(policy.routes)} routes: the kernel splits one default route"
    route = policy.routes[0]
    reasons = (
        (not route.is_default, "a route match needs L7"),
        (route.sticky is not None, "sticky needs the proxy (connect4 runs before the source address is known)"),
        (route.timeout is not None, "timeout needs the proxy"),
        (route.retries is not None, "retries need the proxy"),
        (route.rollout is not None, "rollout analysis needs proxy metrics"),
        (len(route.to) > MAX_BACKENDS, f"more than {MAX_BACKENDS} backends"),
    )
    for broken, reason in reasons:
        if broken:
            return route.mark, reason
    for backend in (policy.backend(to.backend) for to in route.to):
        if backend.tls != "none":
            return backend.mark, f"backend {backend.name} needs the proxy to originate mesh TLS"
        if backend.protocol != "auto":
            return backend.mark, f"backend {backend.name} needs the proxy to speak protocol {backend.protocol}"
        if _ipv4(backend.address.host) is None:
            return backend.mark, f"backend {backend.name} address {backend.address.host} is not an IPv4 address"
    return None


def wants_kernel(policy: TrafficPolicy) -> bool:
    """`dataplane: kernel`, or `auto` on a policy the kernel can serve."""
    return policy.dataplane == "kernel" or (policy.dataplane == "auto" and ineligible(policy) is None)


def compile_split(policy: TrafficPolicy, vip: Address) -> KernelSplit:
    found = ineligible(policy)
    if found is not None:
        mark, reason = found
        raise SplitError(f"{mark}: dataplane kernel: {reason}")
    if _ipv4(vip.host) is None:
        raise SplitError(f"{policy.mark}: dataplane kernel: virtual address {vip} is not IPv4")
    route = policy.routes[0]
    backends = tuple(
        SplitBackend(route.name, to.backend, policy.backend(to.backend).address, to.weight)
        for to in route.to
        if to.weight > 0
    )
    if not backends:
        raise SplitError(f"{route.mark}: dataplane kernel: every weight of route {route.name} is 0")
    return KernelSplit(policy.metadata.name, vip, backends)


def parse_vips(specs: Iterable[str]) -> dict[str, Address]:
    """`NAME=HOST:PORT` items (the `--kernel-vip` flag) into policy name → VIP."""
    vips: dict[str, Address] = {}
    for spec in specs:
        name, sep, address = spec.partition("=")
        host, colon, port = address.rpartition(":")
        if not (sep and colon and name and port.isdigit() and _ipv4(host) is not None and 0 < int(port) < 65536):
            raise ValueError(f"--kernel-vip {spec!r}: expected POLICY=IPV4:PORT, e.g. reviews=127.0.0.1:9080")
        vips[name] = Address(host, int(port))
    return vips


def _ipv4(host: str) -> int | None:
    """The address as the kernel's network-order u32 read on this machine, or None if not IPv4."""
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return None
    return struct.unpack("=I", socket.inet_aton(host))[0]


class KernelSplitter:
    """The connect4/getpeername4 hooks on one cgroup and the VIP tables they read."""

    def __init__(self, cgroup: Cgroup, pin_root: Path = PIN_ROOT) -> None:
        cflags = (f"-DMAX_VIPS={MAX_VIPS}", f"-DMAX_BACKENDS={MAX_BACKENDS}", f"-DMAX_COUNTERS={MAX_COUNTERS}")
        self.hooks = CgroupHooks(SPLIT, cgroup, cflags=cflags, pin_root=pin_root)
        self._names: dict[tuple[Address, Address], tuple[str, str]] = {}

    def start(self) -> None:
        self.hooks.start()

    def apply(self, splits: Iterable[KernelSplit]) -> None:
        """Make the kernel hold exactly `splits`: one atomic value replacement per VIP."""
        vips = self.hooks.table("meshlet_vips")
        wanted = {split.vip: split for split in splits}
        for key in list(vips.keys()):
            if _address(key) not in wanted:
                del vips[key]
        for split in wanted.values():
            vips[_vip_key(vips, split.vip)] = _split_value(vips, split)
            for b in split.backends:
                self._names[(split.vip, b.address)] = (b.route, b.backend)

    def connections(self) -> Mapping[tuple[str, str], int]:
        """Connections rewritten so far, by (route, backend) of the policy that sent them."""
        counts: dict[tuple[str, str], int] = {}
        for key, per_cpu in self.hooks.table("meshlet_conns").items():
            labels = self._names.get((_address(key.vip), _address(key.backend)))
            if labels is not None:
                counts[labels] = counts.get(labels, 0) + sum(per_cpu)
        return counts

    def stop(self) -> None:
        self.hooks.stop()


def _address(key: Any) -> Address:
    return Address(socket.inet_ntoa(struct.pack("=I", key.ip)), key.port)


def _vip_key(table: Any, address: Address) -> Any:
    key = table.Key()
    key.ip, key.port = _ipv4(address.host), address.port
    return key


def _split_value(table: Any, split: KernelSplit) -> Any:
    value = table.Leaf()
    value.count = len(split.backends)
    upto = 0
    for i, b in enumerate(split.backends):
        upto += b.weight
        value.upto[i], value.ip[i], value.port[i] = upto, _ipv4(b.address.host), b.address.port
    value.total = upto
    return value


def plan_splits(policies: Iterable[TrafficPolicy], vips: Mapping[str, Address]) -> tuple[KernelSplit, ...]:
    """The kernel splits the agent programs: `kernel` policies (a VIP is required) and `auto`
    ones that qualify and have a VIP (without one, auto leaves the policy to the proxy).

    The VIP is the policy's `spec.vip`; the agent's `--kernel-vip POLICY=IP:PORT` overrides it
    (a node-local address for testing, or a policy written before the VIP was known).
    """
    policies = tuple(policies)
    unknown = sorted(set(vips) - {p.metadata.name for p in policies})
    if unknown:
        raise SplitError(f"--kernel-vip names no loaded TrafficPolicy: {', '.join(unknown)}")
    splits = []
    for policy in policies:
        vip = vips.get(policy.metadata.name) or policy.vip
        if policy.dataplane == "kernel" and vip is None:
            raise SplitError(
                f"{policy.mark}: policy {policy.metadata.name} has dataplane kernel but no virtual address: "
                f"set spec.vip or pass --kernel-vip {policy.metadata.name}=IP:PORT"
            )
        if vip is not None and wants_kernel(policy):
            splits.append(compile_split(policy, vip))
    taken: dict[Address, str] = {}
    for split in splits:
        if split.vip in taken:
            raise SplitError(f"policies {taken[split.vip]} and {split.policy} both claim virtual address {split.vip}")
        taken[split.vip] = split.policy
    return tuple(splits)
