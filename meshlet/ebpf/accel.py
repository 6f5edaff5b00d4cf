"""Sockmap acceleration of app <-> sidecar loopback sockets (bpf/sockmap_redirect.c).

`SockmapAccelerator` owns the hooks, loaded once and attached to every workload cgroup it is
given (one `--cgroup`, or each meshed Pod's): sockets with a sidecar port at either end go
into one sockhash, keyed by network namespace too, and their messages skip the TCP stack.
A cgroup that leaves (its Pod ended) is detached at once; its sockets close with it. Stopping detaches the
sock_ops hook first (no new sockets), waits a bounded time for accelerated sockets to close,
and only then frees the sockhash: freeing it tears down the psock of every socket still in it
while data may sit in that psock's queue, so the safe order is no new sockets, wait, free.
Sockets still open after the wait keep the maps pinned (and redirected) until a later start
adopts them and a later stop finds them closed.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from meshlet.ebpf import bpfsys
from meshlet.ebpf.cgroup import Cgroup
from meshlet.ebpf.hooks import PIN_ROOT, CgroupHooks, Hook, HookSet
from meshlet.ebpf.maps import fill_map

SIDECAR_PORTS = (15001, 15006)
MAX_SOCKETS = 65535
MAX_PORTS = 64
SOCK_KEY_SIZE = 24  # struct sock_key: the netns cookie (u64) and four u32
STAT_REDIRECTED_BYTES, STAT_REDIRECTED_MSGS, STAT_FALLBACK_MSGS, STAT_INSERTED = range(4)

_SOCK_OPS, _SK_MSG = 13, 16  # BPFProgType.SOCK_OPS, SK_MSG
_CGROUP_SOCK_OPS, _SK_MSG_VERDICT = 3, 7  # BPFAttachType

SOCKMAP = HookSet(
    name="accel",
    source="sockmap_redirect.c",
    hooks=(
        Hook("meshlet_skmsg", _SK_MSG, _SK_MSG_VERDICT, map="meshlet_socks"),
        Hook("meshlet_sockops", _SOCK_OPS, _CGROUP_SOCK_OPS),
    ),
    maps=("meshlet_socks", "meshlet_ports", "meshlet_stats"),
)


@dataclass(frozen=True, slots=True)
class AccelStats:
    sockets: int  # sockets in the sockhash now
    redirected_bytes: int
    redirected_messages: int
    fallback_messages: int  # the peer was not in the map: the normal path carried them
    inserted: int  # sockets ever inserted


class SockmapAccelerator:
    def __init__(self, ports: Iterable[int] = SIDECAR_PORTS, pin_dir: Path = PIN_ROOT / SOCKMAP.name) -> None:
        self.ports = frozenset(ports)
        self.hooks = CgroupHooks(SOCKMAP, pin_dir, cflags=(f"-DMAX_SOCKETS={MAX_SOCKETS}", f"-DMAX_PORTS={MAX_PORTS}"))

    def start(self) -> None:
        self.hooks.start()
        self.set_ports(self.ports)

    def set_targets(self, cgroups: Iterable[Path]) -> dict[Path, str]:
        """Accelerate exactly these cgroups; the ones that refused, path → one line."""
        return self.hooks.attach_exactly(Cgroup(path) for path in cgroups)

    def set_ports(self, ports: Iterable[int]) -> None:
        """Which ports count as sidecar ports; applies to sockets established from now on."""
        self.ports = frozenset(ports)
        if len(self.ports) > MAX_PORTS:
            raise ValueError(f"at most {MAX_PORTS} sidecar ports, got {len(self.ports)}")
        fill_map(self.hooks.table("meshlet_ports"), dict.fromkeys(self.ports, 1))

    def sockets(self) -> int:
        return sum(1 for _ in bpfsys.map_keys(self.hooks.map_fd("meshlet_socks"), SOCK_KEY_SIZE, MAX_SOCKETS + 1))

    def stats(self) -> AccelStats:
        table = self.hooks.table("meshlet_stats")
        totals = [sum(table[table.Key(i)]) for i in range(4)]
        return AccelStats(
            sockets=self.sockets(),
            redirected_bytes=totals[STAT_REDIRECTED_BYTES],
            redirected_messages=totals[STAT_REDIRECTED_MSGS],
            fallback_messages=totals[STAT_FALLBACK_MSGS],
            inserted=totals[STAT_INSERTED],
        )

    def stop(self, drain: float = 2.0) -> int:
        """Remove the hooks; returns how many accelerated sockets were still open (maps kept)."""
        if self.hooks.bpf is None:
            return 0
        left = 0
        try:
            self.hooks.detach_all()
            deadline = time.monotonic() + drain
            left = self.sockets()
            while left and time.monotonic() < deadline:
                time.sleep(0.05)
                left = self.sockets()
        finally:
            self.hooks.close(keep_maps=left > 0)
        return left
