"""The node agent's life cycle: one object owns every kernel object it attaches.

`NodeAgent.run()` is the one try/finally: programs, the clsact filter, the HTB tree and the
pinned maps are set up inside it and removed in its `finally`, whether the loop ends by
SIGTERM, Ctrl-C or an error. A start after `kill -9` finds the leftovers and reconciles them
(the HTB tree is diffed, the clsact is recreated, stale pins are replaced), so nothing is
ever attached twice.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from meshlet.ebpf import hist, source
from meshlet.ebpf.acceleration import AccelConfig, Acceleration
from meshlet.ebpf.aimd import Controller, LoopState
from meshlet.ebpf.htb import HtbTree, changes, port_classes, tree_for, with_ceil
from meshlet.ebpf.kernel_split import KernelSplit, parse_vips, plan_splits
from meshlet.ebpf.maps import fill_port_map
from meshlet.ebpf.observe import MAX_PORTS, TcpObserver
from meshlet.ebpf.pins import PIN_DIR, pin, unpin_all
from meshlet.policy import PolicyInvalid, load_files
from meshlet.policy.model import QoSPolicy, TrafficPolicy
from meshlet.telemetry.node import QosMetrics, TcpCollector, TcpSnapshot, quantile

log = logging.getLogger("meshlet.agent")
T = TypeVar("T")
BOUNDS = (*hist.bounds_seconds(), math.inf)


@dataclass(frozen=True, slots=True)
class AgentConfig:
    ports: frozenset[int]
    qos: QoSPolicy | None = None
    interface: str | None = None  # overrides qos.interface
    interval: float = 1.0
    pin_dir: Path = PIN_DIR
    accel: AccelConfig | None = None  # sockmap redirect / kernel split on a workload cgroup
    policy_files: tuple[Path, ...] = ()  # re-read on change for their kernel splits (see `_reload`)
    kernel_vips: tuple[str, ...] = ()  # the --kernel-vip POLICY=IP:PORT items


class AgentError(Exception):
    """The kernel or bcc refused something the agent needs; the message is one line."""


class NodeAgent:
    def __init__(self, config: AgentConfig, registry: Any) -> None:
        self.config = config
        self.registry = registry
        self.stop = threading.Event()
        self.reload = threading.Event()  # SIGHUP: re-read the policy files now
        self.accel: Acceleration | None = None
        self._stamp = _stamp(config.policy_files)
        self.observer: TcpObserver | None = None
        self.qos_metrics = QosMetrics(registry) if config.qos else None
        self._ipr: Any = None
        self._index = 0

    def run(self, ready: Callable[[], None] = lambda: None) -> None:
        """Attach everything, loop until `stop` is set, then detach everything.

        Each kernel object registers its removal on one ExitStack as soon as it exists, so a
        failure half-way (or a failing removal) still undoes all the rest, in reverse order.
        """
        with contextlib.ExitStack() as undo:
            unpin_all(self.config.pin_dir)  # a crashed agent's pins
            undo.callback(unpin_all, self.config.pin_dir)
            self.observer = _kernel(
                "load the TCP observation programs", TcpObserver, self.config.ports, self.config.pin_dir
            )
            undo.callback(self.observer.close)
            TcpCollector(self.observer.snapshot, hist.bounds_seconds(), registry=self.registry)
            tree = self._setup_qos(undo) if self.config.qos else None
            if self.config.accel is not None:  # pins next to the agent's: <pin root>/{accel,split}-<cgroup id>
                accel = Acceleration(self.config.accel, self.registry, self.config.pin_dir.parent)
                undo.callback(accel.stop)  # before start: a half-done start is undone too
                accel.start()
                self.accel = accel
            log.info("agent: watching ports %s", ",".join(map(str, sorted(self.config.ports))) or "(none)")
            ready()
            self._loop(tree)

    @property
    def _interface(self) -> str:
        assert self.config.qos is not None
        return self.config.interface or self.config.qos.interface

    def _setup_qos(self, undo: contextlib.ExitStack) -> HtbTree:
        from bcc import BPF
        from pyroute2 import IPRoute

        from meshlet.ebpf import tc

        assert self.config.qos is not None and self.qos_metrics is not None
        self._ipr = IPRoute()
        undo.callback(self._ipr.close)
        found = self._ipr.link_lookup(ifname=self._interface)
        if not found:
            raise LookupError(f"interface {self._interface} not found (QoSPolicy {self.config.qos.metadata.name})")
        self._index = found[0]
        undo.callback(self._remove_qdiscs)
        tree = tree_for(self.config.qos)
        todo = changes(tree, tc.read_tree(self._ipr, self._index))
        _kernel(f"set up HTB on {self._interface}", tc.apply, self._ipr, self._index, todo)
        for change in todo:
            log.info("qos: %s on %s", change, self._interface)
        classifier = _kernel(
            "compile bpf/tc_classify.c",
            BPF,
            text=source.translation_unit(source.CLASSIFIER),
            cflags=[f"-DMAX_PORTS={MAX_PORTS}"],
        )
        undo.callback(classifier.cleanup)
        classes = classifier[b"classes"]
        fill_port_map(classes, port_classes(self.config.qos, tree))
        pin(classes.map_fd, "classes", self.config.pin_dir)
        program = classifier.load_func(b"classify", BPF.SCHED_CLS)
        _kernel(f"attach the classifier to {self._interface}", tc.attach_classifier, self._ipr, self._index, program.fd)
        for c in self.config.qos.classes:
            self.qos_metrics.rate.labels(c.name).set(c.ceil)
        return tree

    def _remove_qdiscs(self) -> None:
        from meshlet.ebpf import tc

        clsact = tc.remove_clsact(self._ipr, self._index)
        htb = tc.remove_htb(self._ipr, self._index)
        log.info("agent: removed clsact=%s htb=%s from %s", clsact, htb, self._interface)

    def _loop(self, tree: HtbTree | None) -> None:
        assert self.observer is not None
        qos = self.config.qos
        if qos is None or tree is None or not any(c.slo for c in qos.classes):
            while not self.stop.wait(self.config.interval):  # observation only: nothing to steer
                self._reload()
            return
        controller = Controller.for_policy(qos)
        state = controller.initial()
        previous = self.observer.snapshot()
        while not self.stop.wait(self.config.interval):
            current = self.observer.snapshot()
            p99 = class_p99(qos, previous, current)
            previous = current
            state, tree = self._adjust(controller, state, tree, p99)
            self._reload()

    def _reload(self) -> None:
        """Apply the kernel splits of the policy files when they changed (or on SIGHUP).

        A file that does not load keeps everything as it runs, with one log line. Only the
        splits follow the files: a QoSPolicy change still needs a restart (the HTB tree and
        the loop are built from the one read at start).
        """
        stamp = _stamp(self.config.policy_files)
        if stamp == self._stamp and not self.reload.is_set():
            return
        self.reload.clear()
        self._stamp = stamp
        if self.accel is None:
            return
        try:
            splits = reload_splits(self.config.policy_files, self.config.kernel_vips)
        except PolicyInvalid as e:
            more = f" (and {len(e.errors) - 1} more)" if len(e.errors) > 1 else ""
            log.warning("agent: policy not reloaded, keeping the running splits: %s%s", e.errors[0], more)
            return
        except ValueError as e:
            log.warning("agent: policy not reloaded, keeping the running splits: %s", e)
            return
        if splits != self.accel.splits:
            _kernel("apply the kernel splits", self.accel.apply, splits)
            log.info("agent: kernel splits now %s", ", ".join(_describe(s) for s in splits) or "none (hooks detached)")

    def _adjust(
        self, controller: Controller, state: LoopState, tree: HtbTree, p99: dict[str, float | None]
    ) -> tuple[LoopState, HtbTree]:
        from meshlet.ebpf import tc

        assert self.qos_metrics is not None
        state, adjustments = controller.step(state, p99)
        for a in adjustments:
            new_tree = with_ceil(tree, a.name, a.new)
            _kernel(
                f"change class {a.name} on {self._interface}", tc.apply, self._ipr, self._index, changes(new_tree, tree)
            )
            tree = new_tree
            log.info("%s", a)
            self.qos_metrics.rate.labels(a.name).set(a.new)
            self.qos_metrics.adjustments.labels(a.name, a.direction).inc()
        return state, tree


def _kernel(what: str, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a bcc or netlink call; its failure becomes one AgentError line saying what failed."""
    try:
        return call(*args, **kwargs)
    except (LookupError, AgentError, OSError):
        raise
    except Exception as e:  # bcc raises bare Exception; pyroute2 NetlinkError is not an OSError
        detail = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise AgentError(f"cannot {what}: {detail}") from e


def class_p99(policy: QoSPolicy, before: TcpSnapshot, after: TcpSnapshot) -> dict[str, float | None]:
    """p99 smoothed RTT per SLO'd class over one interval: the difference of two snapshots."""
    out: dict[str, float | None] = {}
    for c in policy.classes:
        if c.slo is None:
            continue
        counts = [0] * hist.SLOTS
        for h in after.histograms:
            if h.name == "srtt" and h.port in c.ports:
                old = _counts(before, h.port, h.direction)
                for slot, (new, prev) in enumerate(zip(h.counts, old, strict=True)):
                    counts[slot] += new - prev
        out[c.name] = quantile(BOUNDS, counts, 0.99)
    return out


def _counts(snapshot: TcpSnapshot, port: int, direction: str) -> tuple[int, ...]:
    found = (h.counts for h in snapshot.histograms if h.name == "srtt" and h.port == port and h.direction == direction)
    return next(found, (0,) * hist.SLOTS)


def policy_ports(
    qos: Iterable[QoSPolicy], traffic: Iterable[TrafficPolicy] = (), extra: Iterable[int] = ()
) -> frozenset[int]:
    """The ports to observe: QoS class ports, traffic policies' backend ports, and `--ports`."""
    backends = {b.address.port for p in traffic for b in p.backends}
    return frozenset(extra) | backends | {port for p in qos for c in p.classes for port in c.ports}


def reload_splits(files: Iterable[Path], vip_specs: Iterable[str]) -> tuple[KernelSplit, ...]:
    """The splits the files ask for now; a `--kernel-vip` naming a policy no longer there is
    ignored (the policy was removed, not misspelled: that was checked at start).
    Raises PolicyInvalid or ValueError (SplitError), one line each."""
    policies = load_files([str(f) for f in files]).traffic
    names = {p.metadata.name for p in policies}
    vips = {name: vip for name, vip in parse_vips(vip_specs).items() if name in names}
    return plan_splits(policies, vips)


def _stamp(files: Iterable[Path]) -> tuple[tuple[int, int] | None, ...]:
    """What tells a changed file: modification time and size (None: cannot stat)."""
    stamps: list[tuple[int, int] | None] = []
    for path in files:
        try:
            st = path.stat()
        except OSError:
            stamps.append(None)
            continue
        stamps.append((st.st_mtime_ns, st.st_size))
    return tuple(stamps)


def _describe(split: KernelSplit) -> str:
    weights = "/".join(f"{b.backend}={b.weight}" for b in split.backends)
    return f"{split.policy}@{split.vip} {weights}"


def stop_on_signals(agent: NodeAgent) -> None:
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: agent.stop.set())
    signal.signal(signal.SIGHUP, lambda *_: agent.reload.set())
