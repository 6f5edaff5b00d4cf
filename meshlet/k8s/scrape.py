"""A Pod's Prometheus annotations under injection: metrics merging's half in the Pod spec.

Istio's way (pkg/kube/inject `applyPrometheusMerge`): the Pod's `prometheus.io/*` annotations
name the app's own scrape target; injection moves that target into the sidecar's
configuration (`meshlet run --app-metrics URL`) and points the annotations at the sidecar's
health port, whose /metrics then serves the sidecar's metrics and the app's, merged
(meshlet.proxy.appmetrics). Without this the app's series would vanish from Prometheus the day
its Pod is injected (and with STRICT mTLS a direct scrape of the app could not pass anyway).

What the Pod declared is recorded in the annotation `RECORD` so injecting again (a new image,
a webhook replay) finds the app's target instead of taking the sidecar's own annotations
for the app's. Annotation names are compared as Prometheus sees them (`prometheus-io/port` is
`prometheus.io/port` to its pod discovery), so no variant is left behind to compete with ours.

Left alone: a Pod that says `prometheus.io/scrape: "false"` (not scraped at all), and, with
`meshlet.dev/merge-metrics: "false"` (or `--no-merge-metrics` for all Pods), a Pod that
declares its own target: Prometheus keeps scraping the app directly, and the sidecar's
metrics are reached by the port name `mesh-health` (the chart's PodMonitor).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

from meshlet.k8s.sidecar import InjectConfig, scrape_annotations

MERGE_ANNOTATION = "meshlet.dev/merge-metrics"
# JSON: {"annotations": the prometheus.io/* annotations as the Pod declared them, "port": the sidecar's}
RECORD = "meshlet.dev/app-prometheus"
_KEYS = ("scrape", "port", "path", "scheme")
_PROMETHEUS = {f"prometheus_io_{key}": key for key in _KEYS}


@dataclass(frozen=True, slots=True)
class Scrape:
    annotations: dict[str, str]  # the Pod's annotations once injected (besides the status marker)
    app_metrics: str | None  # the app's target for `--app-metrics`, or None


def _label(name: str) -> str:
    """The annotation's name as Prometheus' pod discovery turns it into a label."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def _declared(annotations: Mapping[str, str]) -> dict[str, str]:
    """scrape/port/path/scheme, from whichever spelling of each the Pod uses."""
    return {_PROMETHEUS[_label(k)]: v for k, v in annotations.items() if _label(k) in _PROMETHEUS}


def _without_prometheus(annotations: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in annotations.items() if _label(k) not in _PROMETHEUS}


def _record(annotations: Mapping[str, str]) -> tuple[dict[str, str], str]:
    """(the app's annotations, the sidecar port they were replaced by) from `RECORD`; empty if unreadable."""
    try:
        record = json.loads(annotations.get(RECORD) or "{}")
    except ValueError:
        return {}, ""
    app = record.get("annotations") if isinstance(record, dict) else None
    if not isinstance(app, dict):
        return {}, ""
    return {k: v for k, v in app.items() if isinstance(k, str) and isinstance(v, str)}, str(record.get("port", ""))


def as_declared(annotations: Mapping[str, str], cfg: InjectConfig) -> dict[str, str]:
    """The annotations with an earlier injection's scrape target undone: the sidecar's port
    (this one's, or the one the record names) replaced by what the Pod had declared. A port
    the Pod's owner set since to something else is theirs, and the stale record goes."""
    out = {k: v for k, v in annotations.items() if k != RECORD}
    app, port = _record(annotations)
    if _declared(out).get("port") not in {str(cfg.health_port), port} - {""}:
        return out
    return {**_without_prometheus(out), **app}


def plan(annotations: Mapping[str, object], cfg: InjectConfig) -> Scrape:
    """The Pod's scrape annotations and the sidecar's `--app-metrics`; ValueError names a bad annotation."""
    app = as_declared({str(k): str(v) for k, v in annotations.items()}, cfg)
    declared = _declared(app)
    if declared.get("scrape", "").lower() == "false":
        return Scrape(app, None)
    opted_out = not cfg.merge_metrics or app.get(MERGE_ANNOTATION, "").lower() == "false"
    if opted_out and declared:
        return Scrape(app, None)
    ours = {**_without_prometheus(app), **scrape_annotations(cfg)}
    if opted_out or "port" not in declared:
        return Scrape(ours, None)
    url = app_url(declared, cfg)
    record = {"annotations": {k: v for k, v in app.items() if _label(k) in _PROMETHEUS}, "port": str(cfg.health_port)}
    return Scrape({**ours, RECORD: json.dumps(record, sort_keys=True)}, url)


def app_url(declared: Mapping[str, str], cfg: InjectConfig) -> str:
    """`http(s)://127.0.0.1:PORT/PATH` from the Pod's port, path and scheme annotations."""
    port, path = declared["port"].strip(), declared.get("path", "/metrics").strip() or "/metrics"
    scheme = declared.get("scheme", "http").strip().lower() or "http"
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"annotation prometheus.io/port: {port!r} is not a port (1-65535)")
    if int(port) in cfg.ports:
        raise ValueError(f"annotation prometheus.io/port: {int(port)} is a sidecar port; the app's metrics "
                         "must be on a port of its own")
    if not path.startswith("/") or any(c.isspace() or ord(c) < 32 or c == "#" for c in path):
        raise ValueError(f"annotation prometheus.io/path: {path!r} is not a URL path (/metrics, ...)")
    if scheme not in ("http", "https"):
        raise ValueError(f"annotation prometheus.io/scheme: {scheme!r} is neither http nor https")
    return f"{scheme}://127.0.0.1:{int(port)}{path}"
