"""Both eBPF accelerations over a set of workload cgroups, as one object the node agent drives:
sockmap redirect of app<->sidecar sockets (`--accelerate`) and the connect4 split of
`dataplane: kernel` policies. The cgroups are one `--cgroup` on a plain host, or every meshed
Pod of the node in a cluster; each lever is loaded only while it has work (a cgroup, and for
the split a split too), so a node without meshed Pods holds no program, map or pin."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshlet.ebpf import hooks
from meshlet.ebpf.accel import MAX_PORTS, SIDECAR_PORTS, SOCKMAP, SockmapAccelerator
from meshlet.ebpf.cgroup import UNIFIED, Cgroup
from meshlet.ebpf.hooks import PIN_ROOT
from meshlet.ebpf.kernel_split import SPLIT, KernelSplit, KernelSplitter, parse_vips, plan_splits
from meshlet.policy.model import TrafficPolicy
from meshlet.telemetry.accel import AccelCollector, SockmapReading

log = logging.getLogger("meshlet.agent")


@dataclass(frozen=True, slots=True)
class AccelConfig:
    cgroup: Path | None  # the workload's cgroup v2 directory; None in a cluster (the meshed Pods')
    sockmap: bool = False
    sidecar_ports: frozenset[int] = frozenset(SIDECAR_PORTS)
    splits: tuple[KernelSplit, ...] = ()


class Acceleration:
    """`apply(targets, splits)` makes the kernel hold exactly that: the sockmap hooks on every
    target cgroup (when on), the split hooks on every target with its scope and the VIP tables
    of `splits`. A cgroup the kernel refuses does not hold up the others: `apply` returns it
    with the reason, and the next `apply` tries it again."""

    def __init__(self, sockmap: bool, sidecar_ports: Iterable[int] = SIDECAR_PORTS, registry: Any = None,
                 pin_root: Path = PIN_ROOT) -> None:
        self.sockmap_on = sockmap
        self.sidecar_ports = frozenset(sidecar_ports)
        self.pin_root = pin_root
        self.sockmap: SockmapAccelerator | None = None
        self.splitter: KernelSplitter | None = None
        self.splits: tuple[KernelSplit, ...] = ()
        self.targets: Mapping[Path, int] = {}
        if registry is not None:
            AccelCollector(sockmap=self._reading if sockmap else None, kernel_connections=self._connections,
                           registry=registry)

    def apply(self, targets: Mapping[Path, int], splits: tuple[KernelSplit, ...]) -> dict[Path, str]:
        errors: dict[Path, str] = {}
        if self.sockmap_on and targets:
            if self.sockmap is None:  # set before start: stop() undoes a half-done start too
                self.sockmap = SockmapAccelerator(self.sidecar_ports, self.pin_root / SOCKMAP.name)
                self.sockmap.start()
            errors |= self.sockmap.set_targets(targets)
        elif self.sockmap is not None:
            sockmap, self.sockmap = self.sockmap, None
            sockmap.stop()
        if splits and targets:
            if self.splitter is None:
                self.splitter = KernelSplitter(self.pin_root / SPLIT.name)
                self.splitter.start()
            self.splitter.apply(splits)
            errors |= self.splitter.set_targets(targets)
        elif self.splitter is not None:
            splitter, self.splitter = self.splitter, None
            splitter.stop()
        self.targets, self.splits = dict(targets), splits
        return errors

    def sweep(self, cgroups: Iterable[Path], targets: Mapping[Path, int], splits: tuple[KernelSplit, ...]) -> None:
        """Once, at start: what a dead agent left that this one will not take over. Its programs
        go from the cgroups this plan does not hook (on the others, attaching replaces them); a
        lever this plan does not use loses them everywhere, and its pinned maps are adopted and
        freed the way a stop frees them (the sockhash only once its sockets are gone)."""
        levers = ((SOCKMAP, self.sockmap_on and bool(targets), lambda p: SockmapAccelerator(self.sidecar_ports, p)),
                  (SPLIT, bool(splits and targets), KernelSplitter))
        for spec, used, leftover in levers:
            stale = [Cgroup(path) for path in cgroups if not used or path not in targets]
            for path in hooks.sweep(spec, stale):
                log.info("agent: removed a previous agent's %s hooks from %s", spec.name, path)
            pin_dir = self.pin_root / spec.name
            if not used and pin_dir.is_dir():
                lever = leftover(pin_dir)
                try:
                    lever.start()
                finally:
                    lever.stop()
                log.info("agent: freed a previous agent's %s maps in %s", spec.name, pin_dir)

    def attached(self) -> frozenset[Path]:
        """The cgroups every lever that is on has reached."""
        levers = [lever.hooks.cgroups for lever in (self.sockmap, self.splitter) if lever is not None]
        return frozenset.intersection(*(frozenset(c) for c in levers)) if levers else frozenset()

    def stop(self) -> None:
        try:
            if self.splitter is not None:
                self.splitter.stop()
        finally:
            self.splitter = None
            if self.sockmap is not None:
                self.sockmap.stop()
            self.sockmap = None

    def _connections(self) -> Mapping[tuple[str, str, str], int]:
        splitter = self.splitter
        return splitter.connections() if splitter is not None else {}

    def _reading(self) -> SockmapReading:
        sockmap = self.sockmap
        if sockmap is None:
            return SockmapReading(0, 0)
        stats = sockmap.stats()
        return SockmapReading(stats.sockets, stats.redirected_bytes)


def accel_config(
    cgroup: str | None,
    sockmap: bool,
    sidecar_ports: str,
    vip_specs: Iterable[str],
    policies: Iterable[TrafficPolicy],
    cluster: bool = False,
) -> AccelConfig | None:
    """The agent flags (`--accelerate`, `--cgroup`, `--sidecar-ports`, `--kernel-vip`) checked
    into a config, or None without a cgroup. Raises ValueError (one line).

    With `--cgroup` and no split yet, the config is kept: a policy reloaded later may ask for one.
    In a cluster (`--kube`) the targets are the meshed Pods, so `--cgroup` is not asked for.
    """
    splits = plan_splits(policies, parse_vips(vip_specs))
    ports = frozenset(_port(p.strip(), sidecar_ports) for p in sidecar_ports.split(",") if p.strip())
    if not ports and sockmap:
        raise ValueError("--sidecar-ports is empty: --accelerate needs at least one sidecar port")
    if len(ports) > MAX_PORTS:
        raise ValueError(f"--sidecar-ports: at most {MAX_PORTS} ports, got {len(ports)}")
    if cluster:
        if cgroup is not None:
            raise ValueError("--cgroup is for a plain host: with --kube the agent finds each meshed Pod's cgroup")
        return AccelConfig(None, sockmap, ports)
    if cgroup is None:
        if not sockmap and not splits:
            return None
        raise ValueError("--accelerate and --kernel-vip need --cgroup DIR: the workload's cgroup v2 (or --kube)")
    path = Path(cgroup) if Path(cgroup).is_absolute() else UNIFIED / cgroup
    if not (path / "cgroup.controllers").is_file():
        raise ValueError(f"--cgroup {cgroup}: {path} is not a cgroup v2 directory (look under {UNIFIED})")
    return AccelConfig(path, sockmap, ports, splits)


def _port(text: str, flag: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"--sidecar-ports {flag}: {text!r} is not a port number (1..65535)")
    return int(text)
