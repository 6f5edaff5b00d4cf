"""`meshlet agent --kube`: the node agent follows the cluster.

Four list-and-watch loops (the official client, each in a daemon thread) keep what the node's
plan depends on: TrafficPolicies and QoSPolicies of every namespace, every Service (their
ClusterIPs are what kernel splits intercept and send to), and the Pods of this node only (a
field selector on `spec.nodeName`, so a node never holds the cluster's Pods). The Node itself
is read at start and every `node_refresh` seconds for its labels (QoSPolicy nodeSelector).
Access is read-only: list and watch, and get on the Node.

`poll()` turns the current objects into a `NodePlan` when something changed: the pure
`Planner` decides, this edge finds each meshed Pod's cgroup under the kubelet's root. A Pod
whose cgroup is not there yet (the sandbox is being created) is looked for again at the next
poll. The first plan after every watch has listed once also names every Pod cgroup of the node
for the agent to sweep: a dead agent's programs come off those this plan does not hook (a Pod
no longer meshed while no agent ran).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from meshlet.ebpf.agent import NodePlan
from meshlet.k8s.kube import GROUP, PLURALS, VERSION, Cluster, KubeError, api_call, list_watch
from meshlet.k8s.kubelet import pod_cgroups
from meshlet.k8s.nodeplan import ClusterState, Planner

log = logging.getLogger("meshlet.agent")
KINDS = ("traffic", "qos", "services", "pods")


class ClusterPlans:
    def __init__(self, cluster: Cluster, node: str, cgroup_root: Path, interface: str | None = None,
                 extra_ports: Iterable[int] = (), *, sync_timeout: float = 30.0, timeout_seconds: int = 300,
                 backoff: float = 1.0, node_refresh: float = 60.0) -> None:
        from kubernetes import client

        self.cluster = cluster
        self.core = client.CoreV1Api(cluster.api.api_client)
        self.node = node
        self.cgroup_root = cgroup_root
        self.interface = interface
        self.planner = Planner(extra_ports)
        self.objects: dict[str, dict] = {kind: {} for kind in KINDS}
        self.node_labels: dict[str, str] = {}
        self.listed: set[str] = set()
        self.lock = threading.Lock()
        self.changed = threading.Event()
        self.stopping = threading.Event()
        self.sync_timeout, self.timeout_seconds, self.backoff = sync_timeout, timeout_seconds, backoff
        self.node_refresh = node_refresh
        self._pending = False  # a meshed Pod's cgroup was not found: look again next poll
        self._swept = False
        self._first = True

    def start(self) -> None:
        """Read the Node (a wrong --node is an error, not a node that silently has no Pods),
        start the watches and wait, boundedly, until each has listed once."""
        self._read_node()
        api = self.cluster.api
        watches: dict[str, tuple[Callable[..., object], tuple, dict]] = {
            "traffic": (api.list_cluster_custom_object, (GROUP, VERSION, PLURALS["TrafficPolicy"]), {}),
            "qos": (api.list_cluster_custom_object, (GROUP, VERSION, PLURALS["QoSPolicy"]), {}),
            "services": (self.core.list_service_for_all_namespaces, (), {}),
            "pods": (self.core.list_pod_for_all_namespaces, (), {"field_selector": f"spec.nodeName={self.node}"}),
        }
        for kind, (call, args, kwargs) in watches.items():
            threading.Thread(target=list_watch, name=f"watch-{kind}", daemon=True, args=(
                call, args, self._on_list(kind), self._on_event(kind), self.stopping, log.warning),
                kwargs={"what": f"agent: watch {kind}", "kwargs": kwargs, "timeout_seconds": self.timeout_seconds,
                        "backoff": self.backoff}).start()
        threading.Thread(target=self._refresh_node, name="watch-node", daemon=True).start()
        deadline = time.monotonic() + self.sync_timeout
        while len(self.listed) < len(KINDS) and time.monotonic() < deadline:
            self.changed.wait(0.05)
        if len(self.listed) < len(KINDS):
            log.warning("agent: not every watch has listed after %gs (%s missing); going on with what there is",
                        self.sync_timeout, ", ".join(sorted(set(KINDS) - self.listed)))
        log.info("agent: following the cluster for node %s (Pod cgroups under %s)", self.node, self.cgroup_root)

    def stop(self) -> None:
        self.stopping.set()

    def poll(self) -> NodePlan | None:
        if not (self._first or self.changed.is_set() or self._pending):
            return None
        self._first = False
        self.changed.clear()
        with self.lock:
            state = ClusterState(dict(self.objects["traffic"]), dict(self.objects["qos"]),
                                 dict(self.objects["services"]), dict(self.objects["pods"]), dict(self.node_labels))
            synced = len(self.listed) == len(KINDS)
        plan = self.planner.plan(state)
        cgroups = pod_cgroups(self.cgroup_root)
        targets, names = {}, {}
        for pod in plan.meshed:
            path = cgroups.get(pod.uid)
            if path is not None:
                targets[path], names[path] = pod.scope, f"pod {pod.namespace}/{pod.name}"
        self._pending = len(targets) < len(plan.meshed)
        sweep = None
        if synced and not self._swept:  # only once the whole cluster is known: what is not wanted is stale
            self._swept, sweep = True, frozenset(cgroups.values())
        return NodePlan(qos=plan.qos, interface=self.interface, ports=plan.ports, pod_classes=plan.pod_classes,
                        workloads=plan.workloads, targets=targets, splits=plan.splits, names=names,
                        problems=plan.problems, sweep=sweep)

    # -- the watches' callbacks (their threads) ----------------------------------------------

    def _on_list(self, kind: str) -> Callable[[list[dict]], None]:
        def replace(items: list[dict]) -> None:
            with self.lock:
                self.objects[kind] = {_key(kind, obj): obj for obj in items}
                self.listed.add(kind)
            self.changed.set()

        return replace

    def _on_event(self, kind: str) -> Callable[[str, dict], None]:
        def update(event: str, obj: dict) -> None:
            with self.lock:
                if event == "DELETED":
                    self.objects[kind].pop(_key(kind, obj), None)
                else:
                    self.objects[kind][_key(kind, obj)] = obj
            self.changed.set()

        return update

    def _read_node(self) -> None:
        try:
            with api_call(f"node {self.node}"):
                node = self.core.read_node(self.node, _preload_content=False)
        except KubeError as e:
            if ": 404 " in str(e):
                raise KubeError(f"node {self.node} not found: --node (or $NODE_NAME) must name this node") from None
            raise
        labels = (json.loads(node.data).get("metadata") or {}).get("labels") or {}
        with self.lock:
            changed, self.node_labels = labels != self.node_labels, labels
        if changed:
            self.changed.set()

    def _refresh_node(self) -> None:
        while not self.stopping.wait(self.node_refresh):
            try:
                self._read_node()
            except KubeError as e:
                log.warning("agent: %s; keeping the node's labels as they were", e)


def _key(kind: str, obj: dict) -> object:
    meta = obj.get("metadata") or {}
    if kind == "pods":
        return meta.get("uid")
    if kind == "qos":
        return meta.get("name")
    return meta.get("namespace", ""), meta.get("name")
