"""What one sidecar process is told at start: listener addresses and behaviour switches."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from meshlet.policy.model import Address
from meshlet.proxy.listen import is_loopback
from meshlet.telemetry.outcome import UNKNOWN, Workload


def parse_listen(text: str) -> Address:
    """`HOST:PORT`, `[IPv6]:PORT` or `:PORT` (all interfaces); port 0 picks a free port."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"bad address {text!r}: expected HOST:PORT, e.g. 127.0.0.1:15001")
    return Address(host or "0.0.0.0", int(port))


OUTBOUND = Address("127.0.0.1", 15001)
INBOUND = Address("0.0.0.0", 15006)
ADMIN = Address("127.0.0.1", 15000)
APP = Address("127.0.0.1", 8080)
HEALTH_PORT = 15020  # what injection passes as --health [::]:15020 (Istio's status port)


def check_admin(address: Address) -> Address:
    """The control API changes what the sidecar does: ValueError unless it listens on loopback."""
    if not is_loopback(address.host):
        raise ValueError(
            f"--admin {address}: the control API (PUT /policy, rollouts, /certs) listens on loopback only "
            f"(127.0.0.1 or ::1); probes and Prometheus use --health HOST:PORT, e.g. [::]:{HEALTH_PORT}"
        )
    return address


@dataclass(frozen=True, slots=True)
class SidecarConfig:
    """An identity (`identity_dir`, or `identity_server` with `identity_token` and `trust_bundle`)
    switches on mesh TLS (meshlet.mtls.source); without one the sidecar runs cleartext.

    `admin` is loopback-only (checked here, so no path builds a sidecar that serves its control
    API to the network); `health` is the read-only port for probes and scrapes; `control` is
    set by the supervisor for a `--workers` worker: its private API on a Unix socket, instead
    of `admin` and `health`.
    """

    outbound: Address = OUTBOUND
    inbound: Address = INBOUND
    admin: Address = ADMIN
    app: Address = APP
    health: Address | None = None
    control: str | None = None
    workload_labels: tuple[tuple[str, str], ...] = ()  # for workload-scoped inbound mTLS (mtls.selector)
    strict_hosts: bool = False
    drain_timeout: float = 10.0
    metrics_compat: str = "none"
    workload: str = "unknown"  # this workload's name and namespace in Istio-style labels and peer metadata
    workload_namespace: str = "unknown"
    access_log: str = "off"  # off | stdout | a file path (meshlet.telemetry.accesslog)
    app_metrics: str | None = None  # the app's own scrape URL, merged into the health port's /metrics
    identity_dir: Path | None = None
    ca_dir: Path | None = None  # local mode: reissue the identity from this CA before it expires
    identity_server: str | None = None  # `meshlet identity serve`: each process fetches its own certificate
    identity_token: Path | None = None  # projected ServiceAccount token, re-read for every request
    trust_bundle: Path | None = None  # the mesh CAs, followed for rotations
    header_timeout: float = 10.0  # lean engine: a request head must arrive within this (408)
    idle_timeout: float = 60.0  # lean engine: idle keep-alive client connections are closed after this
    engine: str = "lean"  # lean | mitmproxy (meshlet.proxy.engine)
    reuse_port: bool = False  # `--workers` workers share the listeners (SO_REUSEPORT)
    addons: tuple[str, ...] = ()  # mitmproxy addon scripts (`--addon`, absolute paths): mitmproxy engine only

    def __post_init__(self) -> None:
        check_admin(self.admin)

    def mesh_workload(self) -> Workload:
        """This workload as telemetry names it: app and version from the Pod's labels, as Istio reads
        them (app.kubernetes.io/name or app, app.kubernetes.io/version or version)."""
        labels = dict(self.workload_labels)
        app = labels.get("app.kubernetes.io/name") or labels.get("app") or self.workload
        version = labels.get("app.kubernetes.io/version") or labels.get("version") or UNKNOWN
        return Workload(self.workload, self.workload_namespace, UNKNOWN, app, version)

    @property
    def own_ports(self) -> frozenset[int]:
        """The sidecar's listening ports: an inbound connection sent to one of them is refused."""
        addresses = (self.outbound, self.inbound, self.admin, self.health)
        return frozenset(a.port for a in addresses if a is not None and a.port)

    @property
    def has_identity(self) -> bool:
        return self.identity_dir is not None or self.identity_server is not None

    def mode_specs(self) -> list[str]:
        """mitmproxy modes: `regular` takes both Host-header and absolute-form (HTTP_PROXY) requests."""
        return [
            f"regular@{self.outbound}",
            f"reverse:http://{self.app}@{self.inbound}",
        ]


_ADDRESSES = ("outbound", "inbound", "admin", "app", "health")
_PATHS = ("identity_dir", "ca_dir", "identity_token", "trust_bundle")


def config_to_json(config: SidecarConfig) -> dict:
    """For handing the config to worker processes. It holds paths and names, never a key or a
    token: each worker reads those itself."""
    value = {name: getattr(config, name) for name in SidecarConfig.__dataclass_fields__}
    for name in _ADDRESSES:
        value[name] = [value[name].host, value[name].port] if value[name] is not None else None
    for name in _PATHS:
        value[name] = str(value[name]) if value[name] is not None else None
    value["addons"] = list(config.addons)
    value["workload_labels"] = [list(pair) for pair in config.workload_labels]
    return value


def config_from_json(value: dict) -> SidecarConfig:
    fields = dict(value)
    for name in _ADDRESSES:
        fields[name] = Address(fields[name][0], int(fields[name][1])) if fields.get(name) else None
    for name in _PATHS:
        fields[name] = Path(fields[name]) if fields.get(name) else None
    fields["workload_labels"] = tuple((k, v) for k, v in fields.get("workload_labels", ()))
    fields["addons"] = tuple(fields.get("addons", ()))
    return SidecarConfig(**fields)
