"""The validated policy model: frozen values the rest of meshlet compiles from.

Every value carries the `Mark` of the YAML node it came from (excluded from equality), so
checks that span several nodes — weights summing to 100, a route after the default — can
still point the user at a file, line and column.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

API_VERSION = "meshlet.dev/v1alpha1"

Dataplane = Literal["proxy", "kernel", "auto"]
MtlsMode = Literal["STRICT", "PERMISSIVE", "DISABLE"]
BackendTls = Literal["none", "mesh"]
RetryCondition = Literal["connect-failure", "reset", "5xx", "gateway-error"]

DATAPLANES: tuple[str, ...] = ("proxy", "kernel", "auto")
MTLS_MODES: tuple[str, ...] = ("STRICT", "PERMISSIVE", "DISABLE")
BACKEND_TLS: tuple[str, ...] = ("none", "mesh")
RETRY_CONDITIONS: tuple[str, ...] = ("connect-failure", "reset", "5xx", "gateway-error")
IDEMPOTENT_METHODS: frozenset[str] = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


@dataclass(frozen=True, slots=True)
class Mark:
    """Where a value was written: 1-based line and column, as editors count."""

    file: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


NOWHERE = Mark("<memory>", 0, 0)


def _mark() -> Mark:
    return field(default=NOWHERE, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Backend:
    name: str
    address: Address
    tls: BackendTls = "none"
    identity: str | None = None
    mark: Mark = _mark()


@dataclass(frozen=True, slots=True)
class StringMatch:
    """One of exact / prefix / regex; exactly one field is set."""

    exact: str | None = None
    prefix: str | None = None
    regex: str | None = None
    mark: Mark = _mark()


@dataclass(frozen=True, slots=True)
class Match:
    headers: tuple[tuple[str, StringMatch], ...] = ()  # names lower-cased
    cookies: tuple[tuple[str, StringMatch], ...] = ()
    path: StringMatch | None = None
    methods: tuple[str, ...] = ()  # upper-cased; empty = any
    mark: Mark = _mark()

    @property
    def is_empty(self) -> bool:
        return not (self.headers or self.cookies or self.path or self.methods)


@dataclass(frozen=True, slots=True)
class WeightedBackend:
    backend: str
    weight: int
    mark: Mark = _mark()


@dataclass(frozen=True, slots=True)
class Sticky:
    """The key a sticky split hashes: exactly one of header, cookie or source ip."""

    header: str | None = None
    cookie: str | None = None
    source_ip: bool = False
    mark: Mark = _mark()


@dataclass(frozen=True, slots=True)
class Retries:
    attempts: int
    on: tuple[RetryCondition, ...] = ("connect-failure",)
    mark: Mark = _mark()


@dataclass(frozen=True, slots=True)
class Analysis:
    """What a rollout step must show before the canary gets more traffic."""

    min_success_rate: float | None = None  # percent of non-5xx responses, 0..100
    max_p99: float | None = None  # seconds
    min_requests: int = 50  # fewer canary requests in an interval: hold, neither pass nor fail
    mark: Mark = _mark()


@dataclass(frozen=True, slots=True)
class Rollout:
    """Progressive delivery of one route: step the canary's weight while its analysis passes."""

    canary: str
    stable: str
    steps: tuple[int, ...]  # canary weights, ascending, the last usually 100
    interval: float = 30.0  # seconds between analyses
    analysis: Analysis = Analysis()
    failure_limit: int = 2  # failed analyses before rolling back
    mark: Mark = _mark()


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    to: tuple[WeightedBackend, ...]
    match: Match | None = None
    sticky: Sticky | None = None
    timeout: float | None = None  # seconds
    retries: Retries | None = None
    rollout: Rollout | None = None
    mark: Mark = _mark()

    @property
    def is_default(self) -> bool:
        return self.match is None or self.match.is_empty


@dataclass(frozen=True, slots=True)
class Mtls:
    """A workload's inbound mTLS mode and allow list, like Istio's PeerAuthentication: with a
    `selector` (label → value, all must match) it applies to the workloads carrying those
    labels; without one it is the namespace's default."""

    mode: MtlsMode = "PERMISSIVE"
    allow: tuple[str, ...] = ()
    selector: tuple[tuple[str, str], ...] = ()  # sorted; empty: the namespace default
    mark: Mark = _mark()


@dataclass(frozen=True, slots=True)
class Metadata:
    name: str
    namespace: str = "default"
    labels: tuple[tuple[str, str], ...] = ()
    mark: Mark = _mark()


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    metadata: Metadata
    host: str
    backends: tuple[Backend, ...]
    routes: tuple[Route, ...]
    dataplane: Dataplane = "proxy"
    mtls: Mtls | None = None
    qos_class: str | None = None
    vip: Address | None = None  # the service's virtual IPv4:port a kernel split intercepts (a ClusterIP)
    mark: Mark = _mark()

    kind = "TrafficPolicy"

    def backend(self, name: str) -> Backend:
        for backend in self.backends:
            if backend.name == name:
                return backend
        raise KeyError(name)


@dataclass(frozen=True, slots=True)
class Slo:
    p99: float  # seconds
    mark: Mark = _mark()


@dataclass(frozen=True, slots=True)
class QosClass:
    name: str
    priority: int
    rate: int  # bits per second
    ceil: int  # bits per second
    ports: tuple[int, ...] = ()
    slo: Slo | None = None
    mark: Mark = _mark()


@dataclass(frozen=True, slots=True)
class QoSPolicy:
    metadata: Metadata
    interface: str
    classes: tuple[QosClass, ...]
    mark: Mark = _mark()

    kind = "QoSPolicy"


Policy = TrafficPolicy | QoSPolicy


@dataclass(frozen=True, slots=True)
class PolicySet:
    """Everything one load produced: the documents of one or more files, in order."""

    traffic: tuple[TrafficPolicy, ...] = ()
    qos: tuple[QoSPolicy, ...] = ()

    def __iter__(self):
        yield from self.traffic
        yield from self.qos
