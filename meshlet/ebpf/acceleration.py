"""Both eBPF accelerations on one workload cgroup, as one start/stop the node agent calls
inside its try/finally: sockmap redirect of app<->sidecar sockets (`--accelerate`) and the
connect4 split of `dataplane: kernel` policies (`--kernel-vip`)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshlet.ebpf.accel import MAX_PORTS, SIDECAR_PORTS, SockmapAccelerator
from meshlet.ebpf.cgroup import UNIFIED, Cgroup
from meshlet.ebpf.hooks import PIN_ROOT
from meshlet.ebpf.kernel_split import KernelSplit, KernelSplitter, parse_vips, plan_splits
from meshlet.policy.model import TrafficPolicy
from meshlet.telemetry.accel import AccelCollector, SockmapReading


@dataclass(frozen=True, slots=True)
class AccelConfig:
    cgroup: Path  # the workload's cgroup v2 directory (the pod's, in Kubernetes)
    sockmap: bool = False
    sidecar_ports: frozenset[int] = frozenset(SIDECAR_PORTS)
    splits: tuple[KernelSplit, ...] = ()

    @property
    def enabled(self) -> bool:
        return self.sockmap or bool(self.splits)


class Acceleration:
    def __init__(self, config: AccelConfig, registry: Any = None, pin_root: Path = PIN_ROOT) -> None:
        cgroup = Cgroup(config.cgroup)
        self.sockmap = SockmapAccelerator(cgroup, config.sidecar_ports, pin_root) if config.sockmap else None
        self.splitter = KernelSplitter(cgroup, pin_root) if config.splits else None
        self.splits = config.splits
        self._registry = registry

    def start(self) -> None:
        if self.sockmap is not None:
            self.sockmap.start()
        if self.splitter is not None:
            self.splitter.start()
            self.splitter.apply(self.splits)
        if self._registry is not None:
            AccelCollector(
                sockmap=self._reading if self.sockmap else None,
                kernel_connections=self.splitter.connections if self.splitter else None,
                registry=self._registry,
            )

    def apply(self, splits: tuple[KernelSplit, ...]) -> None:
        """New weights for new connections: one atomic map update per VIP."""
        if self.splitter is None:
            raise RuntimeError("the kernel split is off: start the agent with --kernel-vip")
        self.splits = splits
        self.splitter.apply(splits)

    def stop(self) -> None:
        try:
            if self.splitter is not None:
                self.splitter.stop()
        finally:
            if self.sockmap is not None:
                self.sockmap.stop()

    def _reading(self) -> SockmapReading:
        assert self.sockmap is not None
        stats = self.sockmap.stats()
        return SockmapReading(stats.sockets, stats.redirected_bytes)


def accel_config(
    cgroup: str | None,
    sockmap: bool,
    sidecar_ports: str,
    vip_specs: Iterable[str],
    policies: Iterable[TrafficPolicy],
) -> AccelConfig | None:
    """The agent flags (`--accelerate`, `--cgroup`, `--sidecar-ports`, `--kernel-vip`) checked
    into a config, or None when both accelerations are off. Raises ValueError (one line)."""
    splits = plan_splits(policies, parse_vips(vip_specs))
    if not sockmap and not splits:
        return None
    if cgroup is None:
        raise ValueError("--accelerate and --kernel-vip need --cgroup DIR: the workload's cgroup v2")
    path = Path(cgroup) if Path(cgroup).is_absolute() else UNIFIED / cgroup
    if not (path / "cgroup.controllers").is_file():
        raise ValueError(f"--cgroup {cgroup}: {path} is not a cgroup v2 directory (look under {UNIFIED})")
    ports = frozenset(_port(p.strip(), sidecar_ports) for p in sidecar_ports.split(",") if p.strip())
    if not ports and sockmap:
        raise ValueError("--sidecar-ports is empty: --accelerate needs at least one sidecar port")
    if len(ports) > MAX_PORTS:
        raise ValueError(f"--sidecar-ports: at most {MAX_PORTS} ports, got {len(ports)}")
    return AccelConfig(path, sockmap, ports, splits)


def _port(text: str, flag: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"--sidecar-ports {flag}: {text!r} is not a port number (1..65535)")
    return int(text)
