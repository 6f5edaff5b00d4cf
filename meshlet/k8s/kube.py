"""Talking to the Kubernetes API with the official client: connect, apply policies, watch them.

This is the I/O edge; what to apply and how to react to events is decided in
`meshlet.k8s.reconcile` and the policy loader. The `kubernetes` package is imported inside
the functions, so commands that never touch a cluster do not pay for it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from meshlet.k8s.reconcile import Reconciler, Step
from meshlet.policy import load_text
from meshlet.policy.model import API_VERSION, PolicySet

GROUP, VERSION = API_VERSION.split("/")
PLURALS = {"TrafficPolicy": "trafficpolicies", "QoSPolicy": "qospolicies"}
FIELD_MANAGER = "meshlet"
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")

Applied = Literal["created", "configured", "unchanged"]


class KubeError(Exception):
    """The cluster could not be reached or refused a request; one line for the user."""


@dataclass(frozen=True)
class Cluster:
    """An API client and the namespace to use when a document names none."""

    api: object  # kubernetes.client.CustomObjectsApi
    namespace: str


def connect(context: str | None = None, kubeconfig: str | None = None) -> Cluster:
    """Kubeconfig (`$KUBECONFIG` or ~/.kube/config, optionally one context), else in-cluster."""
    from kubernetes import client

    api_client, namespace = connect_client(context, kubeconfig)
    return Cluster(client.CustomObjectsApi(api_client), namespace)


def connect_client(context: str | None = None, kubeconfig: str | None = None) -> tuple[object, str]:
    """`connect`'s ApiClient (for any API group) and the namespace to default to."""
    from kubernetes import client, config

    path = kubeconfig or os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
    path = path.split(os.pathsep)[0]
    if Path(path).is_file():
        try:
            api_client = config.new_client_from_config(config_file=path, context=context, persist_config=False)
            contexts, active = config.list_kube_config_contexts(config_file=path)
        except (config.ConfigException, OSError, yaml.YAMLError) as e:
            raise KubeError(f"kubeconfig {path}: {e}") from None
        chosen = next((c for c in contexts if c["name"] == context), active) if context else active
        namespace = (chosen or {}).get("context", {}).get("namespace") or "default"
        return api_client, namespace
    if context:
        raise KubeError(f"--context {context}: no kubeconfig at {path}")
    try:
        config.load_incluster_config()
    except config.ConfigException as e:
        raise KubeError(f"no kubeconfig at {path} and not running in a Pod ({e})") from None
    namespace = os.environ.get("POD_NAMESPACE") or _read(SERVICE_ACCOUNT_NAMESPACE) or "default"
    return client.ApiClient(), namespace


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _describe(e: Exception) -> str:
    """An ApiException as one line: the API server's Status message, not the HTTP dump."""
    import json

    body = getattr(e, "body", None)
    try:
        message = json.loads(body).get("message") if body else None
    except (ValueError, AttributeError):
        message = None
    status = getattr(e, "status", None)
    return f"{status} {message or getattr(e, 'reason', '') or e}".strip() if status else str(e)


def _unreachable() -> tuple[type[Exception], ...]:
    """Connection failures: urllib3 wraps them (MaxRetryError, ProtocolError), none is an OSError."""
    import urllib3

    return (OSError, urllib3.exceptions.HTTPError)


def _reason(e: Exception) -> str:
    return str(getattr(e, "reason", None) or e)


@contextlib.contextmanager
def api_call(what: str) -> Iterator[None]:
    """The client's failures inside as one-line KubeErrors: `WHAT: <the API server's message>`,
    or that the API cannot be reached."""
    from kubernetes.client.exceptions import ApiException

    try:
        yield
    except ApiException as e:
        raise KubeError(f"{what}: {_describe(e)}") from None
    except _unreachable() as e:
        raise KubeError(f"cannot reach the Kubernetes API: {_reason(e)}") from None


# -- apply ---------------------------------------------------------------------------------------


def documents(text: str, file: str, namespace: str | None) -> list[dict]:
    """Validate with the policy loader (errors as FILE:LINE:COL), then the raw documents to send.

    `--namespace` fills documents that name none; a document naming another is an error, as
    with kubectl. Raises PolicyInvalid or KubeError; nothing has been sent yet.
    """
    from meshlet.k8s.manifest import Yaml12Loader

    load_text(text, file)
    out = []
    for doc in yaml.load_all(text, Loader=Yaml12Loader):
        if not doc:
            continue
        meta = doc.setdefault("metadata", {})
        if doc["kind"] == "TrafficPolicy":
            if namespace and meta.get("namespace", namespace) != namespace:
                raise KubeError(f"{file}: {doc['kind']} {meta['name']!r} is in namespace {meta['namespace']!r}, "
                                f"not {namespace!r} given with --namespace")
            if namespace:
                meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)  # QoS policies are cluster-wide
        out.append(doc)
    return out


def apply(cluster: Cluster, doc: dict) -> Applied:
    """Server-side apply, as `kubectl apply --server-side --force-conflicts`, reporting like kubectl."""
    from kubernetes.client.exceptions import ApiException

    api, kind, meta = cluster.api, doc["kind"], doc["metadata"]
    plural, name = PLURALS[kind], meta["name"]
    scoped = kind == "TrafficPolicy"
    namespace = meta.setdefault("namespace", cluster.namespace) if scoped else None
    target = (GROUP, VERSION, namespace, plural, name) if scoped else (GROUP, VERSION, plural, name)
    get = api.get_namespaced_custom_object if scoped else api.get_cluster_custom_object
    patch = api.patch_namespaced_custom_object if scoped else api.patch_cluster_custom_object
    with api_call(f"{kind.lower()}.{GROUP}/{name}"):
        try:
            before = get(*target)
        except ApiException as e:
            if e.status != 404:
                raise
            before = None
        after = patch(*target, doc, field_manager=FIELD_MANAGER, force=True,
                      _content_type="application/apply-patch+yaml")
    if before is None:
        return "created"
    same = before["metadata"].get("resourceVersion") == after["metadata"].get("resourceVersion")
    return "unchanged" if same else "configured"


def apply_file(path: str, context: str | None = None, namespace: str | None = None,
               kubeconfig: str | None = None) -> list[str]:
    """`meshlet apply FILE --kube`: validate locally, then apply every document; kubectl-style lines.

    Raises PolicyInvalid (nothing sent) or KubeError.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise KubeError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    docs = documents(text, path, namespace)
    cluster = connect(context, kubeconfig)
    return [f"{doc['kind'].lower()}.{GROUP}/{doc['metadata']['name']} {apply(cluster, doc)}" for doc in docs]


# -- watch ---------------------------------------------------------------------------------------


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def list_watch(
    list_call: Callable[..., object],
    args: tuple,
    on_list: Callable[[list[dict]], None],
    on_event: Callable[[str, dict], None],
    stop: threading.Event,
    log: Callable[[str], None],
    *,
    what: str,
    kwargs: dict | None = None,
    timeout_seconds: int = 300,
    backoff: float = 1.0,
) -> None:
    """List, then watch, until `stop` is set: the informer loop every watcher of meshlet runs.

    `on_list(items)` gets every (re)list, `on_event(type, object)` each ADDED/MODIFIED/DELETED
    in between, objects as the API server's JSON. A dropped or expired watch resumes from the
    last resourceVersion, or lists again (410 Gone, or the API unreachable); API errors are
    logged as `WHAT: <message>; retrying in Ns` and retried after `backoff`.
    """
    import json

    from kubernetes import watch
    from kubernetes.client.exceptions import ApiException

    kwargs = kwargs or {}
    version: str | None = None
    while not stop.is_set():
        try:
            if version is None:
                listing = json.loads(list_call(*args, **kwargs, _preload_content=False).data)
                version = listing["metadata"]["resourceVersion"]
                on_list(listing.get("items") or [])
            stream = watch.Watch()
            for event in stream.stream(list_call, *args, **kwargs, resource_version=version,
                                       timeout_seconds=timeout_seconds, allow_watch_bookmarks=True):
                if stop.is_set():
                    stream.stop()
                    break
                version = stream.resource_version or version
                if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                    on_event(event["type"], event["raw_object"])
        except ApiException as e:
            if e.status == 410:  # our resourceVersion is too old: list afresh
                version = None
                continue
            log(f"{what}: {_describe(e)}; retrying in {backoff:g}s")
            stop.wait(backoff)
        except _unreachable() as e:
            log(f"{what}: cannot reach the Kubernetes API: {_reason(e)}; retrying in {backoff:g}s")
            version = None
            stop.wait(backoff)


def watch_policies(
    cluster: Cluster,
    on_policies: Callable[[PolicySet, str], None],
    stop: threading.Event,
    log: Callable[[str], None],
    *,
    namespace: str | None = None,
    timeout_seconds: int = 300,
    backoff: float = 1.0,
) -> None:
    """List, then watch the namespace's TrafficPolicies until `stop` is set.

    Calls `on_policies(set, source)` with each new valid set and its text as one multi-document
    policy (the sidecar swaps its table there, e.g. `PolicyState.apply(source)`), and writes
    each resource's Ready condition.
    """
    reconciler = Reconciler()

    def on_list(items: list[dict]) -> None:
        _handle(cluster, items, reconciler.resync(items, _now()), reconciler, on_policies, log)

    def on_event(kind: str, obj: dict) -> None:
        _handle(cluster, [obj], [reconciler.event(kind, obj, _now())], reconciler, on_policies, log)

    args = (GROUP, VERSION, namespace or cluster.namespace, PLURALS["TrafficPolicy"])
    list_watch(cluster.api.list_namespaced_custom_object, args, on_list, on_event, stop, log,
               what="watch-kube", timeout_seconds=timeout_seconds, backoff=backoff)


def _handle(cluster: Cluster, objs: list[dict], steps: list[Step], reconciler: Reconciler,
            on_policies: Callable[[PolicySet, str], None], log: Callable[[str], None]) -> None:
    from kubernetes.client.exceptions import ApiException

    for step in steps:
        log(f"watch-kube: {step.log}")
    latest = next((s.policies for s in reversed(steps) if s.policies is not None), None)
    if latest is not None:
        on_policies(latest, reconciler.source())
    current = {(o.get("metadata") or {}).get("name"): o for o in objs}
    for step in steps:
        obj = current.get(step.name)
        if step.condition is None or obj is None or _has_condition(obj, step.condition.status_patch()):
            continue
        meta = obj["metadata"]
        target = (GROUP, VERSION, meta["namespace"], PLURALS["TrafficPolicy"], meta["name"])
        patch = step.condition.status_patch()  # a merge patch replaces the list: keep others' conditions
        patch["status"]["conditions"] += [c for c in (obj.get("status") or {}).get("conditions", [])
                                          if c.get("type") != "Ready"]
        try:
            cluster.api.patch_namespaced_custom_object_status(*target, patch)
        except (ApiException, *_unreachable()) as e:
            log(f"watch-kube: cannot write status of {step.name}: {_describe(e)}")


def _has_condition(obj: dict, patch: dict) -> bool:
    """Writing a status identical but for its timestamp would only cause another MODIFIED event."""
    def key(condition: dict) -> tuple:
        return tuple(condition.get(k) for k in ("type", "status", "reason", "message", "observedGeneration"))

    types = {c["type"] for c in patch["status"]["conditions"]}  # others' (the rollout's) are not ours to judge
    have = [key(c) for c in (obj.get("status") or {}).get("conditions", []) if c.get("type") in types]
    return [key(c) for c in patch["status"]["conditions"]] == have
