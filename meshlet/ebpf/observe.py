"""The TCP observation programs: compiled once, filtered by a ports map, read as snapshots."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from meshlet.ebpf import bpfsys, hist, source
from meshlet.ebpf.maps import fill_port_map
from meshlet.ebpf.pins import pin
from meshlet.telemetry.node import ProgramMisses, TcpCounter, TcpHistogram, TcpSnapshot

MAX_PORTS = 64
_METRICS = {0: "connect_latency", 1: "srtt"}  # METRIC_* in bpf/meshlet_hist.h
_RETRANS = 2
_DIRECTIONS = {0: "in", 1: "out"}  # DIR_* in bpf/meshlet_hist.h


class TcpObserver:
    """Owns the BPF module of the three tracepoint programs; `close()` detaches them."""

    def __init__(self, ports: Iterable[int] = (), pin_dir: Path | None = None) -> None:
        from bcc import BPF

        self._bpf = BPF(
            text=source.translation_unit(source.HEADER, *source.OBSERVERS),
            cflags=[*hist.cflags(), f"-DMAX_PORTS={MAX_PORTS}", *source.include_flags()],
        )
        self.pins = (
            [pin(self._bpf[name].map_fd, name.decode(), pin_dir) for name in (b"ports", b"hist")] if pin_dir else []
        )
        self.set_ports(ports)

    def set_ports(self, ports: Iterable[int]) -> None:
        """Make the watched ports exactly `ports` (added and removed in place, data kept)."""
        wanted = set(ports)
        if len(wanted) > MAX_PORTS:
            raise ValueError(f"at most {MAX_PORTS} ports can be watched, got {len(wanted)}")
        fill_port_map(self._bpf[b"ports"], dict.fromkeys(wanted, 1))

    @property
    def ports(self) -> frozenset[int]:
        return frozenset(key.value for key in self._bpf[b"ports"])

    def snapshot(self) -> TcpSnapshot:
        """All histograms and counters as they are now (the kernel keeps counting meanwhile)."""
        slots: dict[tuple[int, int, int], list[int]] = defaultdict(lambda: [0] * hist.SLOTS)
        sums: dict[tuple[int, int, int], int] = defaultdict(int)
        retransmits = []
        for key, value in self._bpf[b"hist"].items():
            series = (key.metric, key.port, key.direction)
            if key.metric == _RETRANS:
                retransmits.append(TcpCounter(key.port, _DIRECTIONS[key.direction], value.value))
            elif key.slot == hist.SLOT_SUM:
                sums[series] = value.value
            else:
                slots[series][key.slot] = value.value
        histograms = tuple(
            TcpHistogram(_METRICS[metric], port, _DIRECTIONS[direction], tuple(counts), sums[series] / 1e6)
            for series, counts in sorted(slots.items())
            for metric, port, direction in [series]
        )
        return TcpSnapshot(
            histograms, tuple(sorted(retransmits, key=lambda c: (c.port, c.direction))), self.missed()
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


def _tracepoint(function: bytes) -> str:
    """`tracepoint__sock__inet_sock_set_state` (bcc's name for a TRACEPOINT_PROBE) -> `sock:inet_sock_set_state`."""
    _, category, event = function.decode().split("__", 2)
    return f"{category}:{event}"
