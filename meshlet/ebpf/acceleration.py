"""Both eBPF accelerations on one workload cgroup, as one start/stop the node agent calls
inside its try/finally: sockmap redirect of app<->sidecar sockets (`--accelerate`) and the
connect4 split of `dataplane: kernel` policies (`--kernel-vip`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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
    """The accelerations of one cgroup. The split's hooks exist only while some split does:
    `apply` attaches them with the first split and detaches them when the last one goes."""

    def __init__(self, config: AccelConfig, registry: Any = None, pin_root: Path = PIN_ROOT) -> None:
        self.cgroup = Cgroup(config.cgroup)
        self.pin_root = pin_root
        self.sockmap = SockmapAccelerator(self.cgroup, config.sidecar_ports, pin_root) if config.sockmap else None
        self.splitter: KernelSplitter | None = None
        self.splits: tuple[KernelSplit, ...] = ()
        self._initial = config.splits
        self._registry = registry

    def start(self) -> None:
        if self.sockmap is not None:
            self.sockmap.start()
        self.apply(self._initial)
        if self._registry is not None:
            AccelCollector(
                sockmap=self._reading if self.sockmap else None,
                kernel_connections=self._connections,
                registry=self._registry,
            )

    def apply(self, splits: tuple[KernelSplit, ...]) -> None:
        """Make the kernel split exactly `splits`: new weights for new connections, one atomic
        map update per VIP; entries of VIPs no longer split are deleted, and with no split left
        the connect4/getpeername4 hooks are detached and their maps unpinned."""
        if splits and self.splitter is None:
            self.splitter = KernelSplitter(self.cgroup, self.pin_root)  # set first: stop() undoes a half start
            self.splitter.start()
        if self.splitter is not None and splits:
            self.splitter.apply(splits)
        elif self.splitter is not None:
            splitter, self.splitter = self.splitter, None
            splitter.stop()
        self.splits = splits

    def _connections(self) -> Mapping[tuple[str, str], int]:
        splitter = self.splitter
        return splitter.connections() if splitter is not None else {}

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
    into a config, or None without a cgroup. Raises ValueError (one line).

    With `--cgroup` and no split yet, the config is kept: a policy reloaded later may ask for one.
    """
    splits = plan_splits(policies, parse_vips(vip_specs))
    if cgroup is None:
        if not sockmap and not splits:
            return None
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
