"""Sidecar injection as a pure function of one Kubernetes object: the shared core of
`meshlet inject` (files) and `meshlet webhook` (admission), so both produce the same Pod.

Injection first removes anything an earlier injection added, then adds it afresh: injecting
twice equals injecting once, and re-injecting with a new image upgrades in place. The input
object is never modified; callers get a new one (or the same one when nothing applies).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from meshlet.k8s import scrape, sidecar
from meshlet.k8s.sidecar import InjectConfig
from meshlet.k8s.workload import workload_name

OPT_OUT = "meshlet.dev/inject"

# Where each workload kind keeps its Pod template.
TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}

Outcome = Literal["injected", "unchanged", "opted-out", "not-a-workload", "cannot-inject"]


@dataclass(frozen=True, slots=True)
class Injected:
    """What happened to one object; `obj` is the object to emit (new, or the input untouched)."""

    obj: object
    outcome: Outcome
    reason: str = ""
    kind: str = ""
    name: str = ""

    @property
    def changed(self) -> bool:
        return self.outcome == "injected"

    def describe(self) -> str:
        what = f"{self.kind.lower() or 'document'}/{self.name or '?'}"
        return f"{what}: {self.outcome}" + (f" ({self.reason})" if self.reason else "")


def inject_document(obj: object, cfg: InjectConfig) -> tuple[object, list[Injected]]:
    """Inject one document. A List (`kind: List`, `DeploymentList`, ...) is injected item by
    item and rebuilt with its other fields and item order kept; it yields one result per item."""
    if _is_list(obj):
        items, results = [], []
        for item in obj["items"]:
            new_item, item_results = inject_document(item, cfg)
            items.append(new_item)
            results.extend(item_results)
        changed = any(result.changed for result in results)
        return ({**obj, "items": items} if changed else obj), results
    if not isinstance(obj, Mapping):
        return obj, [Injected(obj, "not-a-workload", "not a mapping")]
    kind = obj.get("kind") if isinstance(obj.get("kind"), str) else ""
    result = _inject_workload(obj, kind, cfg)
    return result.obj, [result]


def _is_list(obj: object) -> bool:
    return isinstance(obj, Mapping) and str(obj.get("kind", "")).endswith("List") and isinstance(obj.get("items"), list)


def _inject_workload(obj: Mapping, kind: str, cfg: InjectConfig) -> Injected:
    name = _name(obj)
    if kind not in TEMPLATE_PATHS:
        return Injected(obj, "not-a-workload", kind=kind, name=name)
    template = _get(obj, TEMPLATE_PATHS[kind])
    if not isinstance(template, Mapping) or not isinstance(template.get("spec"), Mapping):
        path = ".".join(TEMPLATE_PATHS[kind] + ("spec",))
        return Injected(obj, "cannot-inject", f"no {path} mapping", kind, name)
    if _opted_out(obj) or _opted_out(template):
        return Injected(obj, "opted-out", f'{OPT_OUT}: "false"', kind, name)
    problem = why_not(template["spec"], cfg)
    annotations = _get(template, ("metadata", "annotations"))
    annotations = annotations if isinstance(annotations, Mapping) else {}
    try:
        bypass = sidecar.bypass_from(annotations)
        scraping = scrape.plan(annotations, cfg)
    except ValueError as e:
        problem = problem or str(e)
    if problem:
        return Injected(obj, "cannot-inject", problem, kind, name)
    out = copy.deepcopy(dict(obj))
    new_template = _get(out, TEMPLATE_PATHS[kind])
    _inject_pod(new_template, cfg, bypass, scraping, workload_name(obj, template, kind))
    if out == obj:
        return Injected(obj, "unchanged", "already injected", kind, name)
    return Injected(out, "injected", kind=kind, name=name)


def inject_pod(pod: Mapping, cfg: InjectConfig) -> Injected:
    """A Pod as the admission webhook sees it (the same path as `kind: Pod` in a file)."""
    return _inject_workload(pod, "Pod", cfg)


def why_not(spec: Mapping, cfg: InjectConfig) -> str:
    """Why this Pod spec cannot get a sidecar, or "" when it can."""
    if spec.get("hostNetwork") is True:
        return "hostNetwork: true; the redirect would capture the node's traffic"
    containers = spec.get("containers")
    if not isinstance(containers, list) or not containers or not all(isinstance(c, Mapping) for c in containers):
        return "spec.containers is missing or not a list of containers"
    for container in [*containers, *_list(spec.get("initContainers"))]:
        if not isinstance(container, Mapping) or container.get("name") in sidecar.CONTAINER_NAMES:
            continue
        for port in _list(container.get("ports")):
            if isinstance(port, Mapping) and port.get("containerPort") in cfg.ports:
                name, used = container.get("name"), port["containerPort"]
                return f"container {name!r} uses port {used}, reserved for the sidecar"
        user = (container.get("securityContext") or {}).get("runAsUser")
        if user == cfg.uid:
            return f"container {container.get('name')!r} runs as UID {cfg.uid}, whose traffic bypasses the sidecar"
    return ""


def _inject_pod(template: dict, cfg: InjectConfig, bypass: sidecar.Bypass, scraping: scrape.Scrape,
                workload: str) -> None:
    """Mutate a deep-copied Pod (or Pod template) in place: strip old injection, add the new one."""
    metadata = template.setdefault("metadata", {})
    if not isinstance(metadata, dict):
        metadata = template["metadata"] = {}
    annotations = {k: v for k, v in scraping.annotations.items() if k != sidecar.STATUS_ANNOTATION}
    metadata["annotations"] = {**annotations, sidecar.STATUS_ANNOTATION: "injected"}
    spec = template["spec"]
    containers = [c for c in spec["containers"] if c.get("name") not in sidecar.CONTAINER_NAMES]
    inits = [c for c in _list(spec.get("initContainers")) if _name_of(c) not in sidecar.CONTAINER_NAMES]
    volumes = [v for v in _list(spec.get("volumes")) if _name_of(v) not in sidecar.VOLUME_NAMES]
    spec["containers"] = containers
    spec["initContainers"] = [
        sidecar.init_container(cfg, bypass),
        sidecar.proxy_container(cfg, _app_port(containers), workload, scraping.app_metrics), *inits,
    ]
    spec["volumes"] = [*volumes, *sidecar.volumes(cfg)]


def _app_port(containers: list) -> int | None:
    """The first declared TCP container port: where inbound traffic goes after the sidecar."""
    for container in containers:
        for port in _list(container.get("ports")):
            tcp = isinstance(port, Mapping) and port.get("protocol", "TCP") == "TCP"
            if tcp and isinstance(port.get("containerPort"), int):
                return port["containerPort"]
    return None


def _opted_out(obj: Mapping) -> bool:
    metadata = obj.get("metadata")
    if not isinstance(metadata, Mapping):
        return False
    for where in ("annotations", "labels"):
        values = metadata.get(where)
        if isinstance(values, Mapping) and str(values.get(OPT_OUT, "")).lower() in ("false", "disabled"):
            return True
    return False


def _get(obj: object, path: tuple[str, ...]) -> object:
    for key in path:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(key)
    return obj


def _list(value: object) -> list:
    return value if isinstance(value, list) else []


def _name_of(value: object) -> object:
    return value.get("name") if isinstance(value, Mapping) else None


def _name(obj: Mapping) -> str:
    metadata = obj.get("metadata")
    if isinstance(metadata, Mapping):
        return str(metadata.get("name") or metadata.get("generateName") or "")
    return ""
