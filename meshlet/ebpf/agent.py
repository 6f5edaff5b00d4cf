"""The node agent's life cycle: one object owns every kernel object it attaches.

`NodeAgent.run()` is the one try/finally: programs, the clsact filter, the HTB tree, the
cgroup hooks and the pinned maps are set up inside it and removed in its `finally`, whether
the loop ends by SIGTERM, Ctrl-C or an error. What the kernel should hold is a `NodePlan`;
a plan source says when it changes (the policy files on a plain host, the cluster's policies,
Pods and Services with `--kube`) and `_apply` moves the kernel there with the fewest changes,
keeping the running state when something refuses. A start after `kill -9` finds the
leftovers and reconciles them (the HTB tree is diffed, the clsact is recreated, pinned maps
are adopted, hooks are attached again, replacing the dead agent's), so nothing is ever
attached twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from meshlet.ebpf import hist
from meshlet.ebpf.acceleration import AccelConfig, Acceleration
from meshlet.ebpf.calls import AgentError, kernel
from meshlet.ebpf.hooks import HookError
from meshlet.ebpf.kernel_split import LOCAL_SCOPE, KernelSplit, parse_vips, plan_splits
from meshlet.ebpf.observe import TcpObserver, WorkloadTag
from meshlet.ebpf.pins import PIN_DIR, unpin_all
from meshlet.ebpf.shaper import Shaper
from meshlet.policy import PolicyInvalid, load_files
from meshlet.policy.model import PolicySet, QoSPolicy, TrafficPolicy
from meshlet.telemetry.node import AgentMetrics, TcpCollector, TcpSnapshot, quantile

__all__ = ["AgentConfig", "AgentError", "NodeAgent", "NodePlan", "PlanSource", "Problem", "stop_on_signals"]

log = logging.getLogger("meshlet.agent")
BOUNDS = (*hist.bounds_seconds(), math.inf)


@dataclass(frozen=True, slots=True)
class AgentConfig:
    ports: frozenset[int]  # observed at start; a plan adds its policies' ports
    qos: QoSPolicy | None = None
    interface: str | None = None  # overrides qos.interface
    interval: float = 1.0
    pin_dir: Path = PIN_DIR
    accel: AccelConfig | None = None  # sockmap redirect / kernel split on a workload cgroup (or the meshed Pods')
    policy_files: tuple[Path, ...] = ()  # re-read on change (see `FilePlans`)
    kernel_vips: tuple[str, ...] = ()  # the --kernel-vip POLICY=IP:PORT items
    extra_ports: frozenset[int] = frozenset()  # --ports


@dataclass(frozen=True, slots=True)
class Problem:
    """A policy the agent could not (fully) apply, for the log and the error counter; `error`
    False is a note, not a failure (an `auto` policy the proxy keeps)."""

    kind: str
    namespace: str
    name: str
    message: str
    error: bool = True

    def __str__(self) -> str:
        where = f"{self.namespace}/{self.name}" if self.namespace else self.name
        return f"{self.kind.lower()}/{where}: {self.message}"


@dataclass(frozen=True, slots=True)
class NodePlan:
    """What the kernel should hold, whoever decided it."""

    qos: QoSPolicy | None = None
    interface: str | None = None  # the agent's --interface, over the policy's
    ports: frozenset[int] = frozenset()  # observed by the TCP programs
    pod_classes: Mapping[str, str] = field(default_factory=dict)  # Pod IPv4 → QoS class
    workloads: Mapping[str, WorkloadTag] = field(default_factory=dict)  # Pod IPv4 → whose
    targets: Mapping[Path, int] = field(default_factory=dict)  # cgroup → scope: the hooks go there
    splits: tuple[KernelSplit, ...] = ()
    names: Mapping[Path, str] = field(default_factory=dict)  # cgroup → how logs name it (a Pod)
    problems: tuple[Problem, ...] = ()  # what the source could not apply: logged once, counted
    sweep: frozenset[Path] | None = None  # once, at start: every workload cgroup a dead agent may have hooked


class PlanSource(Protocol):
    """Where plans come from. `poll` returns a new plan when something changed since the last
    call (the first call always returns one), else None; it logs what it refused."""

    def start(self) -> None: ...

    def poll(self) -> NodePlan | None: ...

    def stop(self) -> None: ...


class NodeAgent:
    def __init__(self, config: AgentConfig, registry: Any, source: PlanSource | None = None,
                 strict_start: bool = True) -> None:
        self.config = config
        self.registry = registry
        self.stop = threading.Event()
        self.reload = threading.Event()  # SIGHUP: re-read the policy files now
        self.source: PlanSource = source or FilePlans(config, self.reload)
        self.strict_start = strict_start  # a plain host's first plan must apply whole, or the agent exits
        self.metrics = AgentMetrics(registry)
        self.accel: Acceleration | None = None
        self.observer: TcpObserver | None = None
        self.shaper: Shaper | None = None
        self.plan = NodePlan()
        self._refusals: dict[Path, str] = {}
        self._reported: set[str] = set()
        self._retry: NodePlan | None = None

    def run(self, ready: Callable[[], None] = lambda: None) -> None:
        """Attach everything, loop until `stop` is set, then detach everything.

        Each kernel object registers its removal on one ExitStack as soon as it exists, so a
        failure half-way (or a failing removal) still undoes all the rest, in reverse order.
        """
        with contextlib.ExitStack() as undo:
            self.source.start()  # first: a source that cannot start (a wrong --node) touches no kernel state
            undo.callback(self.source.stop)
            unpin_all(self.config.pin_dir)  # a crashed agent's pins
            undo.callback(unpin_all, self.config.pin_dir)
            self.observer = kernel(
                "load the TCP observation programs", TcpObserver, self.config.ports, self.config.pin_dir
            )
            undo.callback(self.observer.close)
            TcpCollector(self.observer.snapshot, hist.bounds_seconds(), registry=self.registry)
            self.shaper = Shaper(self.registry, self.config.pin_dir)
            undo.callback(self.shaper.remove)
            if self.config.accel is not None:  # pins next to the agent's: <pin root>/{accel,split}
                accel = self.config.accel
                self.accel = Acceleration(accel.sockmap, accel.sidecar_ports, self.registry,
                                          self.config.pin_dir.parent)
                undo.callback(self.accel.stop)
            first = self.source.poll()
            self._apply(first or NodePlan(ports=self.config.ports), strict=self.strict_start)
            log.info("agent: watching ports %s", ",".join(map(str, sorted(self.plan.ports))) or "(none)")
            ready()
            self._loop()

    def _loop(self) -> None:
        assert self.observer is not None and self.shaper is not None
        previous = self.observer.snapshot()
        while not self.stop.wait(self.config.interval):
            if self.shaper.controller is not None and self.shaper.policy is not None:
                current = self.observer.snapshot()
                self.shaper.step(class_p99(self.shaper.policy, previous, current))
                previous = current
            plan = self.source.poll() or self._retry  # a plan the kernel refused in part is tried again
            if plan is not None:
                self._apply(plan, strict=False)

    def _apply(self, plan: NodePlan, strict: bool) -> None:
        """Move the kernel to `plan`. With `strict`, the first refusal is raised (the agent
        exits 1 with it); otherwise it is logged once, counted, the rest goes on, and the plan
        is tried again next interval (an interface or a cgroup that was not there yet)."""
        assert self.observer is not None and self.shaper is not None
        problems = list(plan.problems)
        complete = True
        try:
            self.shaper.apply(plan.qos, plan.interface, plan.pod_classes)
        except (LookupError, AgentError) as e:
            if strict:
                raise
            name = plan.qos.metadata.name if plan.qos else "?"
            problems.append(Problem("QoSPolicy", "", name, f"not applied, no shaping: {e.args[0]}"))
            complete = False
        self.observer.set_ports(plan.ports)
        self.observer.set_workloads(plan.workloads)
        if self.accel is not None:
            complete &= self._apply_hooks(plan, strict)
        self._report(problems)
        self.plan = plan
        self._retry = None if complete else dataclasses.replace(plan, sweep=None)

    def _report(self, problems: tuple[Problem, ...]) -> None:
        """Each problem once while it lasts (not every interval); errors count."""
        for problem in problems:
            if str(problem) in self._reported:
                continue
            if problem.error:
                log.warning("agent: %s", problem)
                self.metrics.policy_errors.labels(problem.kind, problem.namespace, problem.name).inc()
            else:
                log.info("agent: %s", problem)
        self._reported = {str(p) for p in problems}

    def _apply_hooks(self, plan: NodePlan, strict: bool) -> bool:
        """The cgroup hooks and kernel splits of `plan`; False if a cgroup refused (try again)."""
        assert self.accel is not None
        before, previous_splits = self.accel.attached(), self.accel.splits
        try:
            if plan.sweep is not None:
                kernel("remove a previous agent's hooks", self.accel.sweep, plan.sweep, plan.targets, plan.splits)
            refused = kernel("apply the kernel splits", self.accel.apply, plan.targets, plan.splits)
        except (AgentError, OSError) as e:
            if strict:
                raise
            # Not tried again by itself (a program that did not load will not load next second): the next plan will.
            log.warning("agent: cgroup hooks not applied, keeping what runs: %s", e.args[-1] if e.args else e)
            return True
        if refused and strict:
            raise HookError(next(iter(refused.values())))
        for path, reason in refused.items():
            if self._refusals.get(path) != reason:  # once per reason, not every interval
                log.warning("agent: %s: %s", plan.names.get(path, path), reason)
        self._refusals = refused
        after = self.accel.attached()
        for path in sorted(after - before):
            log.info("agent: hooks attached to %s (cgroup %s)", plan.names.get(path, path), path)
        for path in sorted(before - after):
            log.info("agent: hooks detached from %s (cgroup %s)", self.plan.names.get(path, path), path)
        self.metrics.hooked_cgroups.set(len(after))
        if plan.splits != previous_splits:
            described = ", ".join(_describe(s) for s in plan.splits) or "none (hooks detached)"
            log.info("agent: kernel splits now %s", described)
        return not refused


class FilePlans:
    """Plans from policy files and flags (a plain host): re-read when a file changes (or on
    SIGHUP). A file that does not load keeps everything as it runs, with one log line."""

    def __init__(self, config: AgentConfig, reload: threading.Event) -> None:
        self.config = config
        self.reload = reload
        self._stamp = _stamp(config.policy_files)
        self._first = True

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def poll(self) -> NodePlan | None:
        if self._first:
            splits = self.config.accel.splits if self.config.accel else ()
            plan = self._plan(self.config.qos, self.config.ports, splits)
            self._first = False
            return plan
        stamp = _stamp(self.config.policy_files)
        if stamp == self._stamp and not self.reload.is_set():
            return None
        self.reload.clear()
        self._stamp = stamp
        try:
            policies = load_files([str(f) for f in self.config.policy_files])
            splits = _splits(policies.traffic, self.config.kernel_vips)
            qos = _one_qos(policies)
        except PolicyInvalid as e:
            more = f" (and {len(e.errors) - 1} more)" if len(e.errors) > 1 else ""
            log.warning("agent: policy not reloaded, keeping the running state: %s%s", e.errors[0], more)
            return None
        except ValueError as e:
            log.warning("agent: policy not reloaded, keeping the running state: %s", e)
            return None
        ports = policy_ports([qos] if qos else [], policies.traffic, self.config.extra_ports)
        return self._plan(qos, ports, splits)

    def _plan(self, qos: QoSPolicy | None, ports: frozenset[int], splits: tuple[KernelSplit, ...]) -> NodePlan:
        accel = self.config.accel
        targets = {accel.cgroup: LOCAL_SCOPE} if accel is not None and accel.cgroup is not None else {}
        sweep = frozenset(targets) if self._first else None
        return NodePlan(qos=qos, interface=self.config.interface, ports=ports, targets=targets, splits=splits,
                        sweep=sweep)


def _one_qos(policies: PolicySet) -> QoSPolicy | None:
    if len(policies.qos) > 1:
        names = ", ".join(q.metadata.name for q in policies.qos)
        raise ValueError(f"one QoSPolicy per node, got {len(policies.qos)}: {names}")
    return policies.qos[0] if policies.qos else None


def class_p99(policy: QoSPolicy, before: TcpSnapshot, after: TcpSnapshot) -> dict[str, float | None]:
    """p99 smoothed RTT per SLO'd class over one interval: the difference of two snapshots.
    A class pools its ports' histograms and those of the workloads whose Pods it selected."""
    out: dict[str, float | None] = {}
    old = {h.series: h.counts for h in before.histograms if h.name == "srtt"}
    for c in policy.classes:
        if c.slo is None:
            continue
        counts = [0] * hist.SLOTS
        for h in after.histograms:
            if h.name == "srtt" and (h.port in c.ports or h.qos_class == c.name):
                prev = old.get(h.series, (0,) * hist.SLOTS)
                for slot, (new, was) in enumerate(zip(h.counts, prev, strict=True)):
                    counts[slot] += new - was
        out[c.name] = quantile(BOUNDS, counts, 0.99)
    return out


def policy_ports(
    qos: Iterable[QoSPolicy], traffic: Iterable[TrafficPolicy] = (), extra: Iterable[int] = ()
) -> frozenset[int]:
    """The ports to observe: QoS class ports, traffic policies' backend ports, and `--ports`."""
    backends = {b.address.port for p in traffic for b in p.backends}
    return frozenset(extra) | backends | {port for p in qos for c in p.classes for port in c.ports}


def reload_splits(files: Iterable[Path], vip_specs: Iterable[str]) -> tuple[KernelSplit, ...]:
    """The splits the files ask for now. Raises PolicyInvalid or ValueError (SplitError), one line each."""
    return _splits(load_files([str(f) for f in files]).traffic, vip_specs)


def _splits(policies: tuple[TrafficPolicy, ...], vip_specs: Iterable[str]) -> tuple[KernelSplit, ...]:
    """A `--kernel-vip` naming a policy no longer there is ignored (the policy was removed,
    not misspelled: that was checked at start)."""
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
    where = f"{split.namespace}/{split.policy}" if split.scope != LOCAL_SCOPE else split.policy
    return f"{where}@{split.vip} {weights}"


def stop_on_signals(agent: NodeAgent) -> None:
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: agent.stop.set())
    signal.signal(signal.SIGHUP, lambda *_: agent.reload.set())
