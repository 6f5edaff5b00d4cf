"""Connection-level weighted split in the kernel (bpf/connect4_split.c).

A TrafficPolicy whose one route needs nothing at L7 can be served without any proxy: the
workload's connect() to the service's virtual address (VIP) is rewritten to a backend chosen
by weight. `compile_split` is the pure part (policy → table, or an error with file:line:col);
`KernelSplitter` writes tables into the kernel, one map update per VIP, so a new set of
weights takes effect atomically, for new connections only.

Every VIP belongs to a scope, and so does every cgroup the hooks are attached to: in a
cluster, the Kubernetes namespace (a policy steers its own namespace's clients only, as a
sidecar does); on a plain host, scope 0. A rewritten connection carries `BYPASS_MARK`, which
the injected Pod's iptables rules let past the sidecar (meshlet.k8s.sidecar.redirect_script).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshlet.ebpf.cgroup import Cgroup
from meshlet.ebpf.hooks import PIN_ROOT, CgroupHooks, Hook, HookSet
from meshlet.ebpf.maps import fill_map, ipv4_key, ipv4_text
from meshlet.policy.model import Address, Mark, TrafficPolicy

MAX_VIPS = 1024
MAX_BACKENDS = 16
MAX_COUNTERS = 4096
MAX_SCOPED_CGROUPS = 4096
WEIGHT_TOTAL = 100
# SO_MARK of connections the kernel split: the Pod's redirect returns them before the sidecar's
# REDIRECT. The mark lives on the Pod's own sockets only (a packet leaving the Pod's network
# namespace through its veth loses it), so it cannot meet the node's or the CNI's marks.
BYPASS_MARK = 0x539
LOCAL_SCOPE = 0

_CGROUP_SOCK_ADDR = 18  # BPFProgType
_INET4_CONNECT, _INET4_GETPEERNAME = 10, 29  # BPFAttachType

SPLIT = HookSet(
    name="split",
    source="connect4_split.c",
    hooks=(
        Hook("meshlet_connect4", _CGROUP_SOCK_ADDR, _INET4_CONNECT),
        Hook("meshlet_getpeername4", _CGROUP_SOCK_ADDR, _INET4_GETPEERNAME),
    ),
    maps=("meshlet_vips", "meshlet_conns", "meshlet_origin", "meshlet_scopes"),
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
    """What one VIP's map value holds: the backends of the policy's route, with weights, for
    the clients of one scope (the policy's namespace in a cluster)."""

    policy: str
    vip: Address
    backends: tuple[SplitBackend, ...]
    namespace: str = "default"
    scope: int = LOCAL_SCOPE


def namespace_scope(namespace: str) -> int:
    """A Kubernetes namespace's scope: the same number on every node and after every restart,
    so a restarted agent's kernel state means what the last one's did. Never 0 (the plain
    host's). Two namespaces with one number are a collision the planner refuses."""
    return int.from_bytes(hashlib.sha256(namespace.encode()).digest()[:4], "little") | 1


def ineligible(policy: TrafficPolicy) -> tuple[Mark, str] | None:
    """Why the policy needs the proxy (where, and a reason naming the feature), or None if the kernel can serve it.

    Backend addresses must be IPv4 literals here; in a cluster the agent first resolves
    Service names to their ClusterIPs (meshlet.k8s.nodeplan), then asks again."""
    found = needs_l7(policy)
    if found is not None:
        return found
    for backend in (policy.backend(to.backend) for to in policy.routes[0].to):
        if ipv4_key(backend.address.host) is None:
            return backend.mark, f"backend {backend.name} address {backend.address.host} is not an IPv4 address"
    return None


def needs_l7(policy: TrafficPolicy) -> tuple[Mark, str] | None:
    """What in the policy only a proxy can do, wherever its backends are (what `meshlet
    validate` can judge without a cluster)."""
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
    return None


def wants_kernel(policy: TrafficPolicy) -> bool:
    """`dataplane: kernel`, or `auto` on a policy the kernel can serve."""
    return policy.dataplane == "kernel" or (policy.dataplane == "auto" and ineligible(policy) is None)


def compile_split(policy: TrafficPolicy, vip: Address, scope: int = LOCAL_SCOPE) -> KernelSplit:
    found = ineligible(policy)
    if found is not None:
        mark, reason = found
        raise SplitError(f"{mark}: dataplane kernel: {reason}")
    if ipv4_key(vip.host) is None:
        raise SplitError(f"{policy.mark}: dataplane kernel: virtual address {vip} is not IPv4")
    route = policy.routes[0]
    backends = tuple(
        SplitBackend(route.name, to.backend, policy.backend(to.backend).address, to.weight)
        for to in route.to
        if to.weight > 0
    )
    if not backends:
        raise SplitError(f"{route.mark}: dataplane kernel: every weight of route {route.name} is 0")
    return KernelSplit(policy.metadata.name, vip, backends, policy.metadata.namespace, scope)


def parse_vips(specs: Iterable[str]) -> dict[str, Address]:
    """`NAME=HOST:PORT` items (the `--kernel-vip` flag) into policy name → VIP."""
    vips: dict[str, Address] = {}
    for spec in specs:
        name, sep, address = spec.partition("=")
        host, colon, port = address.rpartition(":")
        if not (sep and colon and name and port.isdigit() and ipv4_key(host) is not None and 0 < int(port) < 65536):
            raise ValueError(f"--kernel-vip {spec!r}: expected POLICY=IPV4:PORT, e.g. reviews=127.0.0.1:9080")
        vips[name] = Address(host, int(port))
    return vips


class KernelSplitter:
    """The connect4/getpeername4 hooks, the cgroups they are attached to (each with its scope)
    and the VIP tables they read."""

    def __init__(self, pin_dir: Path = PIN_ROOT / SPLIT.name) -> None:
        cflags = (f"-DMAX_VIPS={MAX_VIPS}", f"-DMAX_BACKENDS={MAX_BACKENDS}", f"-DMAX_COUNTERS={MAX_COUNTERS}",
                  f"-DMAX_SCOPED_CGROUPS={MAX_SCOPED_CGROUPS}", f"-DBYPASS_MARK={BYPASS_MARK}")
        self.hooks = CgroupHooks(SPLIT, pin_dir, cflags=cflags)
        self._names: dict[tuple[int, Address, Address], tuple[str, str, str]] = {}

    def start(self) -> None:
        self.hooks.start()

    def set_targets(self, targets: Mapping[Path, int]) -> dict[Path, str]:
        """Attach to exactly these cgroups, each with its scope; a cgroup that refuses is left
        out and named in the result (path → one line), the others go on."""
        errors = self.hooks.attach_exactly(Cgroup(path) for path in targets)
        fill_map(self.hooks.table("meshlet_scopes"),
                 {self.hooks.cgroups[path]: scope for path, scope in targets.items() if path in self.hooks.cgroups})
        return errors

    def apply(self, splits: Iterable[KernelSplit]) -> None:
        """Make the kernel hold exactly `splits`: one atomic value replacement per VIP; the new
        ones first, so a client never meets a half-written table."""
        vips = self.hooks.table("meshlet_vips")
        wanted = {(split.scope, split.vip): split for split in splits}
        for split in wanted.values():
            vips[_vip_key(vips, split.scope, split.vip)] = _split_value(vips, split)
            for b in split.backends:
                self._names[(split.scope, split.vip, b.address)] = (split.namespace, b.route, b.backend)
        for key in list(vips.keys()):
            if (key.scope, _address(key.ip, key.port)) not in wanted:
                del vips[key]

    def connections(self) -> Mapping[tuple[str, str, str], int]:
        """Connections rewritten so far, by (namespace, route, backend) of the policy that sent them."""
        counts: dict[tuple[str, str, str], int] = {}
        for key, per_cpu in self.hooks.table("meshlet_conns").items():
            vip, backend = _address(key.vip.ip, key.vip.port), _address(key.backend_ip, key.backend_port)
            labels = self._names.get((key.vip.scope, vip, backend))
            if labels is not None:
                counts[labels] = counts.get(labels, 0) + sum(per_cpu)
        return counts

    def stop(self) -> None:
        self.hooks.stop()


def _address(ip: int, port: int) -> Address:
    return Address(ipv4_text(ip), port)


def _vip_key(table: Any, scope: int, address: Address) -> Any:
    key = table.Key()
    key.scope, key.ip, key.port = scope, ipv4_key(address.host), address.port
    return key


def _split_value(table: Any, split: KernelSplit) -> Any:
    value = table.Leaf()
    value.count = len(split.backends)
    upto = 0
    for i, b in enumerate(split.backends):
        upto += b.weight
        value.upto[i], value.ip[i], value.port[i] = upto, ipv4_key(b.address.host), b.address.port
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
