"""The cluster as one node's agent sees it → what that node's kernel should hold.

The pure core of `meshlet agent --kube`: the watched objects go in as the API server's JSON
(TrafficPolicies and QoSPolicies of every namespace, the Services, this node's Pods, the
Node's labels), a `ClusterPlan` comes out: the kernel splits, each in its namespace's scope,
with the policy's host and backends resolved to Service ClusterIPs; the meshed Pods to hook;
the QoSPolicy that selects this node and the class each Pod's labels choose. Problems met on
the way come out too, for the edge to log and count. No API calls, no files: the edge finds
the Pods' cgroups.

The planner remembers the last good version of each policy, as the sidecars' watch does: an
edit that does not load, or a kernel policy whose Service is gone, keeps what ran.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from meshlet.ebpf.agent import Problem
from meshlet.ebpf.kernel_split import KernelSplit, SplitError, compile_split, namespace_scope, needs_l7
from meshlet.ebpf.maps import ipv4_key
from meshlet.ebpf.observe import MAX_PORTS, WorkloadTag
from meshlet.k8s.reconcile import policy_text
from meshlet.k8s.sidecar import STATUS_ANNOTATION
from meshlet.policy import PolicyInvalid, load_text
from meshlet.policy.model import Address, QoSPolicy, TrafficPolicy

NO_SCOPE = 0  # hooks without kernel splits: the scope no cluster VIP is ever written in
_DONE_PHASES = ("Succeeded", "Failed")  # their containers are gone, and their cgroups with them


@dataclass(frozen=True, slots=True)
class Pod:
    uid: str
    namespace: str
    name: str
    workload: str
    labels: Mapping[str, str]
    ip: str | None  # IPv4, when it has one
    meshed: bool  # has meshlet's sidecar (injected)


@dataclass(frozen=True, slots=True)
class MeshedPod:
    uid: str
    namespace: str
    name: str
    scope: int


@dataclass(frozen=True, slots=True)
class ClusterState:
    """What the watches hold now."""

    traffic: Mapping[tuple[str, str], dict] = dataclasses.field(default_factory=dict)  # (namespace, name)
    qos: Mapping[str, dict] = dataclasses.field(default_factory=dict)  # name
    services: Mapping[tuple[str, str], dict] = dataclasses.field(default_factory=dict)  # (namespace, name)
    pods: Mapping[str, dict] = dataclasses.field(default_factory=dict)  # uid
    node_labels: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ClusterPlan:
    qos: QoSPolicy | None
    pod_classes: Mapping[str, str]  # Pod IPv4 → QoS class
    workloads: Mapping[str, WorkloadTag]  # Pod IPv4 → whose
    ports: frozenset[int]
    splits: tuple[KernelSplit, ...]
    meshed: tuple[MeshedPod, ...]
    problems: tuple[Problem, ...]


@dataclass(frozen=True, slots=True)
class _Loaded:
    version: str  # the resourceVersion last loaded
    good: TrafficPolicy | QoSPolicy | None  # the last version that loaded
    error: str | None  # why the last version did not


class Unresolved(ValueError):
    """A name of the policy is no Service of the cluster (or not one the kernel can use)."""


class Planner:
    def __init__(self, extra_ports: Iterable[int] = ()) -> None:
        self.extra_ports = frozenset(extra_ports)
        self._loaded: dict[tuple[str, str, str], _Loaded] = {}  # (kind, namespace, name)
        self._good_splits: dict[tuple[str, str], KernelSplit] = {}
        self._qos: str | None = None  # the QoSPolicy this node follows

    def plan(self, state: ClusterState) -> ClusterPlan:
        problems: list[Problem] = []
        pods = [p for p in (pod_view(obj) for obj in state.pods.values()) if p is not None]
        scopes = self._scopes({p.namespace for p in pods if p.meshed}, problems)
        traffic = self._load_all("TrafficPolicy", state.traffic, problems)
        splits = self._splits(traffic, scopes, state.services, problems)
        qos = self._select_qos(self._load_all("QoSPolicy", {("", n): o for n, o in state.qos.items()}, problems),
                               state.node_labels, problems)
        pod_classes: dict[str, str] = {}
        workloads: dict[str, WorkloadTag] = {}
        for pod in pods:
            if pod.ip is None:
                continue
            chosen = qos.class_of(pod.labels) if qos else None
            if chosen:
                pod_classes[pod.ip] = chosen
            workloads[pod.ip] = WorkloadTag(pod.namespace, pod.workload, chosen or "")
        meshed = tuple(MeshedPod(p.uid, p.namespace, p.name, scopes.get(p.namespace, NO_SCOPE))
                       for p in sorted(pods, key=lambda p: (p.namespace, p.name)) if p.meshed)
        # Observed ports, the QoS classes' and --ports first: the kernel watches at most MAX_PORTS.
        ports = [port for c in (qos.classes if qos else ()) for port in c.ports]
        ports += sorted(self.extra_ports) + sorted({b.address.port for s in splits for b in s.backends})
        observed = frozenset(list(dict.fromkeys(ports))[:MAX_PORTS])
        return ClusterPlan(qos, pod_classes, workloads, observed, splits, meshed, tuple(problems))

    # -- policies ------------------------------------------------------------------------------

    def _load_all(self, kind: str, objects: Mapping[tuple[str, str], dict],
                  problems: list[Problem]) -> dict[tuple[str, str], TrafficPolicy | QoSPolicy]:
        """Each object loaded once per resourceVersion; a bad one keeps its last good version."""
        good: dict[tuple[str, str], TrafficPolicy | QoSPolicy] = {}
        for (namespace, name), obj in sorted(objects.items()):
            key = (kind, namespace, name)
            version = str((obj.get("metadata") or {}).get("resourceVersion", ""))
            cached = self._loaded.get(key)
            if cached is None or cached.version != version:
                loaded = _load(kind, obj)
                if isinstance(loaded, str):
                    cached = _Loaded(version, cached.good if cached else None, loaded)
                else:
                    cached = _Loaded(version, loaded, None)
                self._loaded[key] = cached
            if cached.error is not None:
                verdict = "keeping the previous version" if cached.good else "not applied"
                problems.append(Problem(kind, namespace, name, f"refused, {verdict}: {cached.error}"))
            if cached.good is not None:
                good[namespace, name] = cached.good
        for key in [k for k in self._loaded if k[0] == kind and (k[1], k[2]) not in objects]:
            del self._loaded[key]  # deleted: no last good version to fall back on
        return good

    def _splits(self, traffic: Mapping[tuple[str, str], TrafficPolicy | QoSPolicy], scopes: Mapping[str, int],
                services: Mapping[tuple[str, str], dict], problems: list[Problem]) -> tuple[KernelSplit, ...]:
        wanted: dict[tuple[str, str], KernelSplit] = {}
        for (namespace, name), policy in traffic.items():
            if not isinstance(policy, TrafficPolicy) or policy.dataplane == "proxy" or namespace not in scopes:
                continue  # no meshed Pod of its namespace here: nothing on this node to steer
            found = needs_l7(policy)
            if found is not None:  # `auto` only: the loader refuses L7 routes for `kernel`
                problems.append(Problem("TrafficPolicy", namespace, name, f"stays in the proxy: {found[1]}", False))
                continue
            try:
                resolved, vip = resolve(policy, services)
                wanted[namespace, name] = compile_split(resolved, vip, scopes[namespace])
            except (Unresolved, SplitError) as e:
                if policy.dataplane == "auto":
                    problems.append(Problem("TrafficPolicy", namespace, name, f"stays in the proxy: {e}", False))
                    continue
                kept = self._good_splits.get((namespace, name))
                verdict = "keeping the previous split" if kept else "not split"
                problems.append(Problem("TrafficPolicy", namespace, name, f"{verdict}: {e}"))
                if kept is not None:
                    wanted[namespace, name] = kept
        self._good_splits = wanted
        taken: dict[tuple[int, Address], str] = {}
        out = []
        for (namespace, name), split in sorted(wanted.items()):
            owner = taken.setdefault((split.scope, split.vip), name)
            if owner != name:
                problems.append(Problem("TrafficPolicy", namespace, name,
                                        f"not split: {owner} already splits {split.vip} in namespace {namespace}"))
                continue
            out.append(split)
        return tuple(out)

    def _select_qos(self, policies: Mapping[tuple[str, str], TrafficPolicy | QoSPolicy],
                    node_labels: Mapping[str, str], problems: list[Problem]) -> QoSPolicy | None:
        """The one QoSPolicy whose nodeSelector takes this node (none: every node). Two that
        both do are a conflict: the one followed so far stays, if it is one of them."""
        chosen = [p for p in policies.values() if isinstance(p, QoSPolicy)
                  and (p.node_selector is None or p.node_selector.matches(node_labels))]
        if len(chosen) > 1:
            names = sorted(p.metadata.name for p in chosen)
            kept = self._qos if self._qos in names else None
            for name in names:
                if name != kept:
                    problems.append(Problem("QoSPolicy", "", name, f"not applied: QoSPolicies {', '.join(names)} all "
                                            "select this node; give them nodeSelectors that do not overlap"))
            chosen = [p for p in chosen if p.metadata.name == kept]
        self._qos = chosen[0].metadata.name if chosen else None
        return chosen[0] if chosen else None

    @staticmethod
    def _scopes(namespaces: Iterable[str], problems: list[Problem]) -> dict[str, int]:
        owners: dict[int, str] = {}
        scopes = {}
        for namespace in sorted(namespaces):
            scope = namespace_scope(namespace)
            if owners.setdefault(scope, namespace) != namespace:
                problems.append(Problem("Namespace", "", namespace, f"no kernel splits: its scope number collides "
                                        f"with namespace {owners[scope]}'s; the sidecar routes its traffic"))
                scope = NO_SCOPE
            scopes[namespace] = scope
        return scopes


def _load(kind: str, obj: dict) -> TrafficPolicy | QoSPolicy | str:
    meta = obj.get("metadata") or {}
    where = f"{kind.lower()}/{meta['namespace']}/{meta.get('name')}" if meta.get("namespace") else \
        f"{kind.lower()}/{meta.get('name')}"
    try:
        loaded = load_text(policy_text(obj), where)
    except PolicyInvalid as e:  # located within the resource: `13:12: route 'canary': ...`
        return "; ".join(f"{error.mark.line}:{error.mark.column}: {error.message}" for error in e.errors)
    found = loaded.traffic if kind == "TrafficPolicy" else loaded.qos
    return found[0] if len(found) == 1 else f"{where}: not a single {kind}"


# -- Services ----------------------------------------------------------------------------------


def service_name(host: str, namespace: str) -> tuple[str, str] | None:
    """(namespace, name) of the Service a host names from `namespace`, as cluster DNS reads it:
    `reviews`, `reviews.shop`, `reviews.shop.svc`, `reviews.shop.svc.cluster.local`."""
    parts = host.lower().rstrip(".").split(".")
    if len(parts) == 1:
        return namespace, parts[0]
    if len(parts) == 2 or parts[2] == "svc":
        return parts[1], parts[0]
    return None


def resolve(policy: TrafficPolicy, services: Mapping[tuple[str, str], dict]) -> tuple[TrafficPolicy, Address]:
    """The policy with its route's backends at their Services' ClusterIPs, and the address the
    kernel intercepts (`spec.vip`, else the host's Service's ClusterIP and its one TCP port).
    Raises Unresolved naming what is missing."""
    namespace = policy.metadata.namespace
    used = {to.backend for route in policy.routes for to in route.to}
    backends = []
    for backend in policy.backends:
        host, port = backend.address.host, backend.address.port
        if backend.name in used and ipv4_key(host) is None:
            ip, ports = _service(services, host, namespace, f"backend {backend.name} address {host}")
            if port not in ports:
                raise Unresolved(f"backend {backend.name}: Service {host} has no TCP port {port} "
                                 f"(it has {', '.join(map(str, sorted(ports))) or 'none'})")
            backend = dataclasses.replace(backend, address=Address(ip, port))
        backends.append(backend)
    resolved = dataclasses.replace(policy, backends=tuple(backends))
    if policy.vip is not None:
        return resolved, policy.vip
    ip, ports = _service(services, policy.host, namespace, f"host {policy.host}")
    if len(ports) != 1:
        listed = ", ".join(map(str, sorted(ports))) or "none"
        raise Unresolved(f"host {policy.host}: its Service has TCP ports {listed}; set spec.vip to the ClusterIP:port "
                         "to split")
    return resolved, Address(ip, next(iter(ports)))


def _service(services: Mapping[tuple[str, str], dict], host: str, namespace: str,
             what: str) -> tuple[str, frozenset[int]]:
    """(ClusterIP, TCP ports) of the Service `host` names."""
    key = service_name(host, namespace)
    obj = services.get(key) if key else None
    if obj is None:
        where = f"{key[0]}/{key[1]}" if key else host
        raise Unresolved(f"{what}: no Service {where}" if key else f"{what} is not a Service name of this cluster")
    spec = obj.get("spec") or {}
    ip = spec.get("clusterIP")
    if ipv4_key(ip or "") is None:
        raise Unresolved(f"{what}: Service {key[0]}/{key[1]} has no IPv4 ClusterIP ({ip or spec.get('type')})")
    ports = frozenset(p["port"] for p in spec.get("ports") or () if p.get("protocol", "TCP") == "TCP")
    return ip, ports


# -- Pods --------------------------------------------------------------------------------------


def pod_view(obj: dict) -> Pod | None:
    """What the agent needs of a Pod; None for Pods whose containers are done, and for
    hostNetwork Pods (their address is the node's: it says nothing about whose traffic)."""
    meta, spec, status = obj.get("metadata") or {}, obj.get("spec") or {}, obj.get("status") or {}
    if spec.get("hostNetwork") or status.get("phase") in _DONE_PHASES or not meta.get("uid"):
        return None
    addresses = [status.get("podIP"), *(a.get("ip") for a in status.get("podIPs") or ())]
    ip = next((a for a in addresses if a and ipv4_key(a) is not None), None)
    annotations = meta.get("annotations") or {}
    return Pod(meta["uid"], meta.get("namespace", "default"), meta.get("name", ""), workload_name(meta),
               dict(meta.get("labels") or {}), ip, annotations.get(STATUS_ANNOTATION) == "injected")


def workload_name(meta: dict) -> str:
    """The workload a Pod belongs to, as people name it: its Deployment (the ReplicaSet's name
    less the pod-template-hash), else its controller, else the Pod itself."""
    owners = meta.get("ownerReferences") or []
    owner = next((o for o in owners if o.get("controller")), owners[0] if owners else None)
    if owner is None:
        return meta.get("name", "")
    name = owner.get("name", "")
    template_hash = (meta.get("labels") or {}).get("pod-template-hash")
    if owner.get("kind") == "ReplicaSet" and template_hash and name.endswith(f"-{template_hash}"):
        return name[: -len(template_hash) - 1]
    return name
