"""The workload name injection gives the sidecar (`meshlet run --workload NAME`).

It is `destination_workload` / `source_workload` in the Istio-style series and what Flagger's
queries select by (`destination_workload=~"podinfo"`). The Pod template's
`app.kubernetes.io/name` label, else its `app` label, else the name of the workload that
owns the Pod: a Deployment, StatefulSet, ... in a file is named by its metadata; a Pod the
webhook sees is named by its controller, as Istio's `GetDeployMetaFromPod` guesses it (a
ReplicaSet's name less its `pod-template-hash` is the Deployment's; a Job's less a CronJob's
timestamp suffix is the CronJob's).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

UNKNOWN = "unknown"
NAME_LABELS = ("app.kubernetes.io/name", "app")
_CRONJOB_SUFFIX = re.compile(r"(.+)-\d{8,10}")


def _mapping(value: object) -> Mapping:
    return value if isinstance(value, Mapping) else {}


def workload_name(obj: Mapping, template: Mapping, kind: str) -> str:
    labels = _mapping(_mapping(template.get("metadata")).get("labels"))
    for key in NAME_LABELS:
        if isinstance(labels.get(key), str) and labels[key]:
            return labels[key]
    metadata = _mapping(obj.get("metadata"))
    if kind != "Pod":
        return str(metadata.get("name") or UNKNOWN)
    owner = _controller(metadata.get("ownerReferences"))
    if owner is not None:
        name, owner_kind = str(owner.get("name") or ""), owner.get("kind")
        hash_ = str(labels.get("pod-template-hash") or "")
        if owner_kind == "ReplicaSet" and hash_ and name.endswith(f"-{hash_}"):
            return name[: -len(hash_) - 1]
        cron = _CRONJOB_SUFFIX.fullmatch(name) if owner_kind == "Job" else None
        if name:
            return cron.group(1) if cron else name
    return str(metadata.get("name") or str(metadata.get("generateName") or "").rstrip("-") or UNKNOWN)


def _controller(references: object) -> Mapping | None:
    if not isinstance(references, list):
        return None
    return next((r for r in references if isinstance(r, Mapping) and r.get("controller") is True), None)
