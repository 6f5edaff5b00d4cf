"""What injection adds to a Pod: the native sidecar, the traffic-capture init container, volumes.

`InjectConfig` is the one place the sidecar's defaults live. `meshlet inject` and `meshlet
webhook` build it from the same flags (`meshlet.k8s.flags`), and the Helm chart's
`values.yaml` mirrors it (a test compares them), so a Pod looks the same whichever path
injected it. Everything here is a pure function of the config: plain dicts in Kubernetes'
wire shape, ready to be placed into a Pod spec.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from meshlet import __version__
from meshlet.ebpf.kernel_split import BYPASS_MARK

PROXY_NAME = "meshlet-proxy"
INIT_NAME = "meshlet-init"
IDENTITY_VOLUME = "meshlet-identity"  # identity mode csi: cert-manager csi-driver-spiffe's volume
TOKEN_VOLUME = "meshlet-token"  # identity mode server: the projected ServiceAccount token
TRUST_VOLUME = "meshlet-trust"  # identity mode server: the trust bundle ConfigMap
TMP_VOLUME = "meshlet-tmp"
PODINFO_VOLUME = "meshlet-podinfo"
IDENTITY_DIR = "/etc/meshlet/identity"
PODINFO_DIR = "/etc/meshlet/podinfo"  # the Downward API's metadata.labels, for mtls.selector
TOKEN_DIR, TOKEN_FILE = "/var/run/secrets/meshlet", "token"
TRUST_DIR, TRUST_FILE = "/etc/meshlet/trust", "ca.pem"
TOKEN_AUDIENCE = "meshlet"  # meshlet.mtls.wire.AUDIENCE: what `meshlet identity serve` asks the TokenReview for
TOKEN_SECONDS = 3600  # the kubelet refreshes the token at 80% of this; the sidecar reads it for every request
CSI_SPIFFE_DRIVER = "spiffe.csi.cert-manager.io"

# Every name injection owns: removing these undoes an earlier injection (idempotency).
CONTAINER_NAMES: frozenset[str] = frozenset({PROXY_NAME, INIT_NAME})
VOLUME_NAMES: frozenset[str] = frozenset({IDENTITY_VOLUME, TOKEN_VOLUME, TRUST_VOLUME, TMP_VOLUME,
                                         PODINFO_VOLUME})
# Where the workload certificate comes from: `meshlet identity serve` (keys in memory), cert-manager's
# csi-driver-spiffe (a CSI volume the driver fills and renews), or nowhere (no mTLS).
IDENTITY_MODES: tuple[str, ...] = ("server", "csi", "none")

# Kubernetes resource quantities: 100m, 0.5, 64Mi, 1G, 1e3.
_QUANTITY = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?")
PULL_POLICIES: tuple[str, ...] = ("Always", "IfNotPresent", "Never")


def check_quantity(text: str) -> str:
    """A resource quantity as Kubernetes parses it; ValueError names the bad text."""
    if not _QUANTITY.fullmatch(text):
        raise ValueError(f"bad resource quantity {text!r}: expected e.g. 100m, 0.5, 64Mi, 1Gi")
    return text


@dataclass(frozen=True, slots=True)
class Resources:
    cpu_request: str = "50m"
    memory_request: str = "64Mi"
    cpu_limit: str | None = "1"
    memory_limit: str | None = "256Mi"

    def to_k8s(self) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {"requests": {"cpu": self.cpu_request, "memory": self.memory_request}}
        limits = {k: v for k, v in (("cpu", self.cpu_limit), ("memory", self.memory_limit)) if v}
        if limits:
            out["limits"] = limits
        return out


@dataclass(frozen=True, slots=True)
class InjectConfig:
    """The sidecar's image, resources and ports; defaults are the chart's values.yaml `proxy:`."""

    # What `make image` builds and tags (scripts/image/build); a registry's name once pushed there.
    image: str = f"localhost/meshlet:{__version__}"
    image_pull_policy: str = "IfNotPresent"
    resources: Resources = field(default_factory=Resources)
    uid: int = 1337
    outbound_port: int = 15001
    inbound_port: int = 15006
    admin_port: int = 15000  # loopback only: the control API
    health_port: int = 15020  # on the Pod IP: /healthz /readyz /metrics for the kubelet and Prometheus
    # Proxy processes; `meshlet run` defaults to the CPU count, which in a Pod is the node's.
    workers: int = 1
    # One SPIFFE identity per service account, from `identity_server` (the chart's identity
    # Service; this default is `helm install meshlet -n meshlet-system`'s) with the mesh CAs from
    # the ConfigMap `trust_bundle`. No workload key is ever in a Secret.
    identity: str = "server"
    identity_server: str = "https://meshlet-identity.meshlet-system.svc:15012"
    trust_bundle: str = "meshlet-trust-bundle"
    # Istio's standard series (istio_requests_total, ...) besides meshlet's: what Flagger, Kiali
    # and Istio's dashboards query.
    metrics_compat: str = "istio"
    # The Pod's own prometheus.io target is served merged with the sidecar's (meshlet.k8s.scrape).
    merge_metrics: bool = True

    @property
    def ports(self) -> frozenset[int]:
        return frozenset({self.outbound_port, self.inbound_port, self.admin_port, self.health_port})


STATUS_ANNOTATION = "meshlet.dev/status"


def scrape_annotations(cfg: InjectConfig) -> dict[str, str]:
    """Annotations-style Prometheus discovery of the sidecar's /metrics (the health port)."""
    return {"prometheus.io/scrape": "true", "prometheus.io/port": str(cfg.health_port),
            "prometheus.io/path": "/metrics"}


def proxy_container(cfg: InjectConfig, app_port: int | None, workload: str = "unknown",
                    app_metrics: str | None = None) -> dict:
    """The native sidecar: an init container with `restartPolicy: Always` (Kubernetes >= 1.29).

    The kubelet starts the next init container, and so the app, only once the startup probe
    passes, so the app never sends a request before the proxy listens and has a policy.

    Who reaches what: the control API is on loopback (the Pod's own processes, `kubectl
    port-forward`); the kubelet's probes and Prometheus reach the read-only health port on the
    Pod IP; `[::]` is IPv4 and IPv6 on one socket, `localhost` both loopbacks (ip6tables
    redirects the app's IPv6 to ::1).

    `workload` names this workload in the metrics, with the namespace from the Downward API
    (`$(POD_NAMESPACE)`, which the kubelet expands from the container's env); `app_metrics` is
    the app's own scrape target, served merged on the health port (meshlet.k8s.scrape).
    """
    args = [
        "run", "--watch-kube",
        "--outbound", f"localhost:{cfg.outbound_port}",
        "--inbound", f"[::]:{cfg.inbound_port}",
        "--admin", f"127.0.0.1:{cfg.admin_port}",
        "--health", f"[::]:{cfg.health_port}",
        "--workload-labels", f"{PODINFO_DIR}/labels",
        "--workers", str(cfg.workers),
        "--workload", workload, "--workload-namespace", "$(POD_NAMESPACE)",
        "--metrics-compat", cfg.metrics_compat,
    ]
    args += identity_args(cfg)
    if app_metrics is not None:
        args += ["--app-metrics", app_metrics]
    if app_port is not None:
        args += ["--app", f"127.0.0.1:{app_port}"]

    def probe(failures: int) -> dict:
        return {"httpGet": {"path": "/readyz", "port": cfg.health_port}, "periodSeconds": 2, "timeoutSeconds": 2,
                "failureThreshold": failures}

    return {
        "name": PROXY_NAME,
        "image": cfg.image,
        "imagePullPolicy": cfg.image_pull_policy,
        "restartPolicy": "Always",
        "command": ["meshlet"],
        "args": args,
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "HOME", "value": "/tmp"},  # mitmproxy keeps its confdir under $HOME
        ],
        "ports": [
            {"name": "mesh-inbound", "containerPort": cfg.inbound_port, "protocol": "TCP"},
            {"name": "mesh-health", "containerPort": cfg.health_port, "protocol": "TCP"},
        ],
        "startupProbe": probe(60),
        "readinessProbe": probe(3),
        "resources": cfg.resources.to_k8s(),
        "securityContext": {
            "runAsUser": cfg.uid,
            "runAsGroup": cfg.uid,
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            *identity_mounts(cfg),
            {"name": TMP_VOLUME, "mountPath": "/tmp"},
            {"name": PODINFO_VOLUME, "mountPath": PODINFO_DIR, "readOnly": True},
        ],
    }


# Pod annotations naming ports the redirect leaves alone, as Istio's excludeInboundPorts /
# excludeOutboundPorts: for protocols the sidecar cannot relay (server-first ones such as MySQL
# or SMTP, where the client waits for the server) or traffic that must not pay for a proxy.
EXCLUDE_INBOUND = "meshlet.dev/exclude-inbound-ports"
EXCLUDE_OUTBOUND = "meshlet.dev/exclude-outbound-ports"


@dataclass(frozen=True, slots=True)
class Bypass:
    inbound: tuple[int, ...] = ()
    outbound: tuple[int, ...] = ()


NO_BYPASS = Bypass()


def bypass_from(annotations: object) -> Bypass:
    """The excluded ports a Pod's annotations name; ValueError names the annotation and its value."""
    if not isinstance(annotations, Mapping):
        return NO_BYPASS
    return Bypass(_ports(annotations, EXCLUDE_INBOUND), _ports(annotations, EXCLUDE_OUTBOUND))


def _ports(annotations: Mapping, key: str) -> tuple[int, ...]:
    text = annotations.get(key)
    if text is None:
        return ()
    items = [item.strip() for item in str(text).split(",") if item.strip()]
    if not all(item.isdigit() and 1 <= int(item) <= 65535 for item in items):
        raise ValueError(f"annotation {key}: {text!r} is not a comma-separated list of ports (1-65535)")
    return tuple(sorted({int(item) for item in items}))


def redirect_script(cfg: InjectConfig, bypass: Bypass = NO_BYPASS) -> str:
    """The shell script that captures the Pod's TCP: inbound → inbound port, outbound → outbound port.

    Both families: iptables, and ip6tables whenever the Pod has IPv6 (any address in
    /proc/net/if_inet6, link-local included), or IPv6 would bypass the sidecar and STRICT mTLS.
    If the Pod has IPv6 but ip6tables cannot program it, the script fails and the Pod does not
    start: closed, not open.

    Safe to run twice in the same network namespace (an init container retried after a
    failure): chains are flushed, not duplicated, and the jumps are added only if missing.
    Excluded: the proxy's own UID (or it would loop into itself), the sidecar's own ports
    inbound (probes and scrapes reach the health port directly; the loopback-only ones are then
    refused by the kernel), loopback destinations and DNS outbound. Were a sidecar port redirected
    all the same, the inbound listener refuses it too (meshlet.proxy.inbound). Also excluded:
    connections the node agent already split in the kernel: its connect4 hook marks them
    (`BYPASS_MARK`) as it rewrites them, so the sidecar never splits them a second time. Only
    the agent's hook sets that mark (an app would need NET_ADMIN to set SO_MARK, and with it
    could flush these rules anyway), and the set of kernel-handled hosts can change at any
    time without touching the Pod: the mark travels with each connection.
    """
    return "\n".join([
        "set -eu",
        *_family_rules("ipt4", "iptables", "127.0.0.0/8", cfg, bypass),
        "if grep -q . /proc/net/if_inet6 2>/dev/null; then",  # proc files stat as empty: read, not -s
        *(f"  {line}" for line in _family_rules("ipt6", "ip6tables", "::1/128", cfg, bypass)),
        "fi",
        "",
    ])


def _family_rules(ipt: str, command: str, loopback: str, cfg: InjectConfig, bypass: Bypass) -> list[str]:
    inbound, outbound = "MESHLET_INBOUND", "MESHLET_OUTPUT"
    rules = [
        # The sidecar's own ports go where the kernel delivers them: the health and inbound ports
        # listen on the Pod IP; the control API and the outbound listener only on loopback, so a
        # peer's connection to them is refused by the kernel, before any proxy sees it.
        *(f"{ipt} -A {inbound} -p tcp --dport {port} -j RETURN" for port in sorted(cfg.ports)),
        *(f"{ipt} -A {inbound} -p tcp --dport {port} -j RETURN" for port in bypass.inbound),
        f"{ipt} -A {inbound} -p tcp -j REDIRECT --to-ports {cfg.inbound_port}",
        f"{ipt} -A {outbound} -m owner --uid-owner {cfg.uid} -j RETURN",
        f"{ipt} -A {outbound} -m mark --mark {BYPASS_MARK:#x} -j RETURN",
        f"{ipt} -A {outbound} -d {loopback} -j RETURN",
        f"{ipt} -A {outbound} -p tcp --dport 53 -j RETURN",  # DNS over TCP is not HTTP
        *(f"{ipt} -A {outbound} -p tcp --dport {port} -j RETURN" for port in bypass.outbound),
        f"{ipt} -A {outbound} -p tcp -j REDIRECT --to-ports {cfg.outbound_port}",
    ]
    return [
        f'{ipt}() {{ {command} -w 5 -t nat "$@"; }}',
        f"for chain in {inbound} {outbound}; do {ipt} -N $chain 2>/dev/null || {ipt} -F $chain; done",
        *rules,
        f"{ipt} -C PREROUTING -p tcp -j {inbound} 2>/dev/null || {ipt} -A PREROUTING -p tcp -j {inbound}",
        f"{ipt} -C OUTPUT -p tcp -j {outbound} 2>/dev/null || {ipt} -A OUTPUT -p tcp -j {outbound}",
    ]


def init_container(cfg: InjectConfig, bypass: Bypass = NO_BYPASS) -> dict:
    """Runs once before the sidecar, as root with only NET_ADMIN/NET_RAW, to install the redirect."""
    return {
        "name": INIT_NAME,
        "image": cfg.image,
        "imagePullPolicy": cfg.image_pull_policy,
        "command": ["/bin/sh", "-c", redirect_script(cfg, bypass)],
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"cpu": "100m", "memory": "64Mi"}},
        "securityContext": {
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": False,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": False,  # iptables takes its lock in /run
            "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]},
        },
    }


def identity_args(cfg: InjectConfig) -> list[str]:
    if cfg.identity == "server":
        return ["--identity-server", cfg.identity_server, "--identity-token", f"{TOKEN_DIR}/{TOKEN_FILE}",
                "--trust-bundle", f"{TRUST_DIR}/{TRUST_FILE}"]
    if cfg.identity == "csi":
        return ["--identity", IDENTITY_DIR]
    return []


def identity_mounts(cfg: InjectConfig) -> list[dict]:
    if cfg.identity == "server":
        return [{"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True},
                {"name": TRUST_VOLUME, "mountPath": TRUST_DIR, "readOnly": True}]
    if cfg.identity == "csi":
        return [{"name": IDENTITY_VOLUME, "mountPath": IDENTITY_DIR, "readOnly": True}]
    return []


def volumes(cfg: InjectConfig) -> list[dict]:
    """What the identity needs, and a scratch dir. The identity is the Pod's service account,
    which the token (or the CSI driver) proves: nothing per account to configure or store.

    Server mode: a projected token only the identity service accepts (audience meshlet, an hour,
    bound to the Pod: deleting the Pod revokes it) and the trust bundle ConfigMap, which is
    required: a missing one holds the Pod in ContainerCreating with an event naming it. No Secret.
    """
    tmp = {"name": TMP_VOLUME, "emptyDir": {}}
    podinfo = {"name": PODINFO_VOLUME,  # the Pod's labels, for mtls.selector (--workload-labels)
               "downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}}
    if cfg.identity == "server":
        token = {"serviceAccountToken": {"audience": TOKEN_AUDIENCE, "expirationSeconds": TOKEN_SECONDS,
                                         "path": TOKEN_FILE}}
        return [{"name": TOKEN_VOLUME, "projected": {"sources": [token]}},
                {"name": TRUST_VOLUME, "configMap": {"name": cfg.trust_bundle, "items": [
                    {"key": TRUST_FILE, "path": TRUST_FILE}]}}, tmp, podinfo]
    if cfg.identity == "csi":
        return [{"name": IDENTITY_VOLUME, "csi": {"driver": CSI_SPIFFE_DRIVER, "readOnly": True}}, tmp, podinfo]
    return [tmp, podinfo]
