"""QoS on one interface: the HTB tree of a QoSPolicy, the clsact classifier, the AIMD loop.

`Shaper.apply` moves the kernel from whatever it holds to a new policy, interface or set of
Pod classes with the fewest changes: the HTB tree is diffed (`htb.changes`), the classifier
is compiled and attached once and then only its maps change, and the loop's state is kept
unless the policy itself changed. So a label edit that moves one Pod to another class is one
map update, and a restart after `kill -9` finds the tree it wants and leaves it alone.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from meshlet.ebpf import source
from meshlet.ebpf.aimd import Controller, LoopState
from meshlet.ebpf.calls import kernel
from meshlet.ebpf.htb import HtbTree, changes, port_classes, tree_for, with_ceil
from meshlet.ebpf.maps import fill_map, ipv4_key
from meshlet.ebpf.observe import MAX_PORTS
from meshlet.ebpf.pins import pin
from meshlet.policy.model import QoSPolicy
from meshlet.telemetry.node import QosMetrics

log = logging.getLogger("meshlet.agent")
MAX_PODS = 1024
MAPS = ("classes", "pods")  # pinned in the agent's pin directory while shaping


class Shaper:
    def __init__(self, registry: Any, pin_dir: Path) -> None:
        self.metrics = QosMetrics(registry)
        self.pin_dir = pin_dir
        self._reset()

    def _reset(self) -> None:
        self.policy: QoSPolicy | None = None
        self.interface: str | None = None
        self.tree: HtbTree | None = None
        self.controller: Controller | None = None
        self.state: LoopState | None = None
        self._pod_classes: dict[str, str] = {}
        self._ipr: Any = None
        self._index = 0
        self._classifier: Any = None

    def apply(self, policy: QoSPolicy | None, interface: str | None = None,
              pod_classes: Mapping[str, str] | None = None) -> None:
        """Shape `interface` (default: the policy's) by `policy`, Pods by address into the
        classes given. None removes everything. Raises LookupError (no such interface) or
        AgentError (the kernel refused), one line each."""
        if policy is None:
            self.remove()
            return
        interface = interface or policy.interface
        if interface != self.interface:
            self.remove()
            self._open(interface, policy)
        if policy != self.policy:
            self._set_tree(policy)
        pods = dict(pod_classes or {})
        if self._classifier is None:
            self._attach_classifier()
        elif policy == self.policy and pods == self._pod_classes:
            return
        if pods != self._pod_classes:
            counts = Counter(pods.values())
            log.info("qos: Pods by class on %s now %s", interface,
                     " ".join(f"{name}={counts[name]}" for name in sorted(counts)) or "none (ports only)")
        self.policy, self._pod_classes = policy, pods
        assert self.tree is not None
        fill_map(self._classifier[b"classes"], port_classes(policy, self.tree))
        ids = {c.name: c.classid for c in self.tree.classes if c.name}
        fill_map(self._classifier[b"pods"],
                 {key: ids[name] for ip, name in pods.items() if (key := ipv4_key(ip)) is not None and name in ids})

    def step(self, p99: Mapping[str, float | None]) -> None:
        """One interval of the AIMD loop on the classes' p99 RTT."""
        if self.controller is None or self.state is None or self.tree is None:
            return
        from meshlet.ebpf import tc

        self.state, adjustments = self.controller.step(self.state, p99)
        for a in adjustments:
            new_tree = with_ceil(self.tree, a.name, a.new)
            kernel(f"change class {a.name} on {self.interface}", tc.apply, self._ipr, self._index,
                   changes(new_tree, self.tree))
            self.tree = new_tree
            log.info("%s", a)
            self.metrics.rate.labels(a.name).set(a.new)
            self.metrics.adjustments.labels(a.name, a.direction).inc()

    def remove(self) -> None:
        """No HTB tree, no classifier, no pins: the interface as it was before the agent."""
        from meshlet.ebpf import tc

        try:
            if self._ipr is not None:
                clsact = tc.remove_clsact(self._ipr, self._index)
                htb = tc.remove_htb(self._ipr, self._index)
                log.info("agent: removed clsact=%s htb=%s from %s", clsact, htb, self.interface)
        finally:
            if self._classifier is not None:
                self._classifier.cleanup()
            for name in MAPS:
                (self.pin_dir / name).unlink(missing_ok=True)
            if self._ipr is not None:
                self._ipr.close()
            self._forget_rates()
            self._reset()

    def _open(self, interface: str, policy: QoSPolicy) -> None:
        from pyroute2 import IPRoute

        ipr = IPRoute()
        found = ipr.link_lookup(ifname=interface)
        if not found:
            ipr.close()
            raise LookupError(f"interface {interface} not found (QoSPolicy {policy.metadata.name})")
        self._ipr, self._index, self.interface = ipr, found[0], interface

    def _set_tree(self, policy: QoSPolicy) -> None:
        from meshlet.ebpf import tc

        tree = tree_for(policy)
        todo = changes(tree, tc.read_tree(self._ipr, self._index))
        kernel(f"set up HTB on {self.interface}", tc.apply, self._ipr, self._index, todo)
        for change in todo:
            log.info("qos: %s on %s", change, self.interface)
        self._forget_rates()
        self.tree = tree
        self.controller = Controller.for_policy(policy) if any(c.slo for c in policy.classes) else None
        self.state = self.controller.initial() if self.controller else None
        for c in policy.classes:
            self.metrics.rate.labels(c.name).set(c.ceil)

    def _forget_rates(self) -> None:
        """Classes of a policy no longer shaped leave the gauge (not frozen at their last ceil)."""
        for c in self.policy.classes if self.policy else ():
            with contextlib.suppress(KeyError):
                self.metrics.rate.remove(c.name)

    def _attach_classifier(self) -> None:
        from bcc import BPF

        from meshlet.ebpf import tc

        classifier = kernel("compile bpf/tc_classify.c", BPF, text=source.translation_unit(source.CLASSIFIER),
                            cflags=[f"-DMAX_PORTS={MAX_PORTS}", f"-DMAX_PODS={MAX_PODS}"])
        self._classifier = classifier
        for name in MAPS:
            pin(classifier[name.encode()].map_fd, name, self.pin_dir)
        program = classifier.load_func(b"classify", BPF.SCHED_CLS)
        kernel(f"attach the classifier to {self.interface}", tc.attach_classifier, self._ipr, self._index,
               program.fd)
