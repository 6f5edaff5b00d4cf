"""The TCP observation programs: compiled once, filtered by a ports map, read as snapshots.

Besides ports, the programs know the node's Pods by address (`set_workloads`): a socket whose
local address is a Pod's counts for that Pod's workload, on any port, so a QoS class that
selects Pods by label has RTT samples of its own and the metrics can say whose traffic it is.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from meshlet.ebpf import bpfsys, hist, source
from meshlet.ebpf.maps import fill_map, ipv4_key
from meshlet.ebpf.pins import pin
from meshlet.telemetry.node import ProgramMisses, TcpCounter, TcpHistogram, TcpSnapshot

MAX_PORTS = 64
MAX_WORKLOAD_IPS = 1024
MAX_TAGS = 0xFFFF  # the kernel's tag is a u16; 0 means "no workload"
HIST_ENTRIES = 65536
_METRICS = {0: "connect_latency", 1: "srtt"}  # METRIC_* in bpf/meshlet_hist.h
_RETRANS = 2
_DIRECTIONS = {0: "in", 1: "out"}  # DIR_* in bpf/meshlet_hist.h


@dataclass(frozen=True, slots=True)
class WorkloadTag:
    """Whose sockets an address's are: the Pod's namespace, its workload, and the QoS class its
    labels chose on this node ("" for none). The kernel counts by a small number per tag."""

    namespace: str
    workload: str
    qos_class: str = ""


class TcpObserver:
    """Owns the BPF module of the three tracepoint programs; `close()` detaches them."""

    def __init__(self, ports: Iterable[int] = (), pin_dir: Path | None = None) -> None:
        from bcc import BPF

        self._bpf = BPF(
            text=source.translation_unit(source.HEADER, *source.OBSERVERS),
            cflags=[*hist.cflags(), f"-DMAX_PORTS={MAX_PORTS}", f"-DMAX_WORKLOAD_IPS={MAX_WORKLOAD_IPS}",
                    f"-DHIST_ENTRIES={HIST_ENTRIES}", *source.include_flags()],
        )
        names = (b"ports", b"hist", b"workloads")
        self.pins = [pin(self._bpf[name].map_fd, name.decode(), pin_dir) for name in names] if pin_dir else []
        # Tags are never reused while the agent runs: the kernel's counts under a tag stay its own.
        self._tags: dict[WorkloadTag, int] = {}
        self._by_tag: dict[int, WorkloadTag] = {}
        self.set_ports(ports)

    def set_ports(self, ports: Iterable[int]) -> None:
        """Make the watched ports exactly `ports` (added and removed in place, data kept)."""
        wanted = set(ports)
        if len(wanted) > MAX_PORTS:
            raise ValueError(f"at most {MAX_PORTS} ports can be watched, got {len(wanted)}")
        fill_map(self._bpf[b"ports"], dict.fromkeys(wanted, 1))

    def set_workloads(self, by_ip: Mapping[str, WorkloadTag]) -> None:
        """Make the kernel know exactly these Pod addresses (IPv4; others are ignored)."""
        wanted: dict[int, int] = {}
        for address, tag in sorted(by_ip.items()):
            key, number = ipv4_key(address), self._tag(tag)
            if key is not None and number and len(wanted) < MAX_WORKLOAD_IPS:
                wanted[key] = number
        fill_map(self._bpf[b"workloads"], wanted)

    def _tag(self, tag: WorkloadTag) -> int:
        number = self._tags.get(tag)
        if number is None and len(self._tags) < MAX_TAGS:
            number = self._tags[tag] = len(self._tags) + 1
            self._by_tag[number] = tag
        return number or 0

    @property
    def ports(self) -> frozenset[int]:
        return frozenset(key.value for key in self._bpf[b"ports"])

    def snapshot(self) -> TcpSnapshot:
        """All histograms and counters as they are now (the kernel keeps counting meanwhile)."""
        slots: dict[tuple[int, int, int, int], list[int]] = defaultdict(lambda: [0] * hist.SLOTS)
        sums: dict[tuple[int, int, int, int], int] = defaultdict(int)
        retransmits = []
        for key, value in self._bpf[b"hist"].items():
            series = (key.metric, key.port, key.direction, key.workload)
            if key.metric == _RETRANS:
                tag = self._by_tag.get(key.workload, _NO_WORKLOAD)
                retransmits.append(
                    TcpCounter(key.port, _DIRECTIONS[key.direction], value.value, tag.namespace, tag.workload)
                )
            elif key.slot == hist.SLOT_SUM:
                sums[series] = value.value
            else:
                slots[series][key.slot] = value.value
        histograms = []
        for series, counts in sorted(slots.items()):
            metric, port, direction, number = series
            tag = self._by_tag.get(number, _NO_WORKLOAD)
            histograms.append(TcpHistogram(_METRICS[metric], port, _DIRECTIONS[direction], tuple(counts),
                                           sums[series] / 1e6, tag.namespace, tag.workload, tag.qos_class))
        return TcpSnapshot(
            tuple(histograms), tuple(sorted(retransmits, key=lambda c: (c.port, c.direction))), self.missed()
        )

    def missed(self) -> tuple[ProgramMisses, ...]:
        """Per tracepoint, the events its program skipped since load (the kernel runs one tracing
        program per CPU at a time). Counts above are short by exactly these."""
        return tuple(
            ProgramMisses(_tracepoint(name), bpfsys.prog_info(function.fd).recursion_misses)
            for name, function in sorted(self._bpf.funcs.items())
        )

    def close(self) -> None:
        for path in self.pins:
            path.unlink(missing_ok=True)
        self._bpf.cleanup()


_NO_WORKLOAD = WorkloadTag("", "")


def _tracepoint(function: bytes) -> str:
    """`tracepoint__sock__inet_sock_set_state` (bcc's name for a TRACEPOINT_PROBE) -> `sock:inet_sock_set_state`."""
    _, category, event = function.decode().split("__", 2)
    return f"{category}:{event}"
