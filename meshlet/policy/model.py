"""The validated policy model: frozen values the rest of meshlet compiles from.

Every value carries the `Mark` of the YAML node it came from (excluded from equality), so
checks that span several nodes — weights summing to 100, a route after the default — can
still point the user at a file, line and column.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from meshlet.policy.errors import PolicyWarning

API_VERSION = "meshlet.dev/v1alpha1"

Dataplane = Literal["proxy", "kernel", "auto"]
MtlsMode = Literal["STRICT", "PERMISSIVE", "DISABLE"]
BackendTls = Literal["none", "mesh"]
BackendProtocol = Literal["http1", "http2", "auto"]
RetryCondition = Literal[
    "connect-failure", "reset", "5xx", "gateway-error",
    "unavailable", "resource-exhausted", "cancelled", "deadline-exceeded", "internal",
]

DATAPLANES: tuple[str, ...] = ("proxy", "kernel", "auto")
MTLS_MODES: tuple[str, ...] = ("STRICT", "PERMISSIVE", "DISABLE")
BACKEND_TLS: tuple[str, ...] = ("none", "mesh")
# auto: the client's own protocol; http2 with tls none is h2c with prior knowledge (RFC 9113 §3.3).
BACKEND_PROTOCOLS: tuple[str, ...] = ("http1", "http2", "auto")
# gRPC status code → the retry condition it matches (Istio's retryOn names, gRPC's codes).
GRPC_RETRY_CONDITIONS: dict[int, str] = {
    14: "unavailable", 8: "resource-exhausted", 1: "cancelled", 4: "deadline-exceeded", 13: "internal",
}
RETRY_CONDITIONS: tuple[str, ...] = ("connect-failure", "reset", "5xx", "gateway-error",
                                     *GRPC_RETRY_CONDITIONS.values())
SelectorOperator = Literal["In", "NotIn", "Exists", "DoesNotExist"]
SELECTOR_OPERATORS: tuple[str, ...] = ("In", "NotIn", "Exists", "DoesNotExist")
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
    protocol: BackendProtocol = "auto"
    # What the backend is, for metrics when no peer metadata says it (a backend without a sidecar).
    workload: str | None = None
    version: str | None = None
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
    """`on` holds what YAML writes as `retryOn` (`on` is its deprecated old name)."""

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
class LabelRequirement:
    key: str
    operator: SelectorOperator
    values: tuple[str, ...] = ()
    mark: Mark = _mark()

    def holds(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "Exists":
            return self.key in labels
        if self.operator == "DoesNotExist":
            return self.key not in labels
        inside = labels.get(self.key) in self.values
        return inside if self.operator == "In" else not inside


@dataclass(frozen=True, slots=True)
class LabelSelector:
    """Kubernetes' label selector (matchLabels and matchExpressions, all must hold); an empty
    selector selects everything, as in Kubernetes."""

    match_labels: tuple[tuple[str, str], ...] = ()
    match_expressions: tuple[LabelRequirement, ...] = ()
    mark: Mark = _mark()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.match_labels) and all(
            r.holds(labels) for r in self.match_expressions
        )

    def __str__(self) -> str:
        """`{app=reviews, tier In (web,api)}`, for messages that name a selector."""
        terms = [f"{k}={v}" for k, v in self.match_labels]
        for r in self.match_expressions:
            terms.append(f"{r.key} {r.operator}" + (f" ({','.join(r.values)})" if r.values else ""))
        return "{" + ", ".join(terms) + "}"


@dataclass(frozen=True, slots=True)
class Mtls:
    """A workload's inbound mTLS mode and allow list, like Istio's PeerAuthentication: with a
    `selector` it applies to the workloads whose labels it matches; without one it is the
    namespace's default."""

    mode: MtlsMode = "PERMISSIVE"
    allow: tuple[str, ...] = ()
    selector: LabelSelector | None = None  # None: the namespace default
    mark: Mark = _mark()


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
    pod_selector: LabelSelector | None = None  # the node's Pods whose traffic is this class
    mark: Mark = _mark()


@dataclass(frozen=True, slots=True)
class QoSPolicy:
    metadata: Metadata
    interface: str
    classes: tuple[QosClass, ...]
    node_selector: LabelSelector | None = None  # the nodes it shapes (in a cluster); None: every node
    mark: Mark = _mark()

    def class_of(self, labels: Mapping[str, str]) -> str | None:
        """The class a Pod with these labels is in: of the classes whose podSelector selects
        it, the one with the lowest priority number (then name); None if none does."""
        chosen = [c for c in self.classes if c.pod_selector is not None and c.pod_selector.matches(labels)]
        return min(chosen, key=lambda c: (c.priority, c.name)).name if chosen else None

    kind = "QoSPolicy"


Policy = TrafficPolicy | QoSPolicy


@dataclass(frozen=True, slots=True)
class PolicySet:
    """Everything one load produced: the documents of one or more files, in order, and the
    warnings (deprecated spellings) that did not stop it."""

    traffic: tuple[TrafficPolicy, ...] = ()
    qos: tuple[QoSPolicy, ...] = ()
    warnings: tuple[PolicyWarning, ...] = field(default=(), compare=False)

    def __iter__(self):
        yield from self.traffic
        yield from self.qos
