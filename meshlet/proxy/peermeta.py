"""Peer metadata exchange: how each sidecar of a mesh hop learns who is on the other side.

Istio's sidecars swap workload metadata in `x-envoy-peer-metadata` headers; meshlet's do the same
in `x-meshlet-peer-metadata`, a short `key=value;...` list. The caller's sidecar sends its own on
a mesh-mTLS request, the callee's sidecar answers with its own on the response, and each strips
the header before the app or client sees it. A value is believed only on a connection whose peer
certificate was verified, and only the certificate names the principal: the header can add a
workload name and version to a verified identity, never change which identity it is (its
namespace must agree with the SPIFFE ID's, else only the certificate's facts are kept).
"""

from __future__ import annotations

import re
from functools import lru_cache

from meshlet.policy.model import Backend
from meshlet.telemetry.outcome import UNKNOWN, Workload

HEADER = b"x-meshlet-peer-metadata"
HEADER_NAME = HEADER.decode()
MAX_LENGTH = 512
_VALUE = re.compile(r"[A-Za-z0-9._-]{1,63}")
_SERVICE = re.compile(r"[A-Za-z0-9._-]{1,253}")
_KEYS = frozenset({"workload", "namespace", "app", "version", "service"})
_SPIFFE_NAMESPACE = re.compile(r"spiffe://[^/]+/ns/([^/]+)/")


def encode(me: Workload, service: str = "") -> bytes:
    """This workload's metadata (and, on a request, the service host it was routed by)."""
    fields = (("workload", me.workload), ("namespace", me.namespace), ("app", me.app), ("version", me.version))
    parts = [f"{key}={value}" for key, value in fields if value != UNKNOWN and _VALUE.fullmatch(value)]
    if service and service != UNKNOWN and _SERVICE.fullmatch(service):
        parts.append(f"service={service}")
    return ";".join(parts).encode()


def decode(value: bytes | str) -> tuple[Workload, str] | None:
    """(workload, service) from a header value; None for anything malformed. Unknown keys are
    ignored (a newer peer may send more); a principal in the header is one of them."""
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    if len(text) > MAX_LENGTH:
        return None
    fields: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, sep, item = part.partition("=")
        if not sep:
            return None
        if key in _KEYS:
            if not (_SERVICE if key == "service" else _VALUE).fullmatch(item):
                return None
            fields[key] = item
    workload = Workload(
        workload=fields.get("workload", UNKNOWN), namespace=fields.get("namespace", UNKNOWN),
        app=fields.get("app", UNKNOWN), version=fields.get("version", UNKNOWN),
    )
    return workload, fields.get("service", UNKNOWN)


def spiffe_namespace(principal: str) -> str | None:
    """The namespace of a Kubernetes SPIFFE ID (spiffe://DOMAIN/ns/NS/sa/SA)."""
    match = _SPIFFE_NAMESPACE.match(principal)
    return match.group(1) if match else None


def trusted(decoded: tuple[Workload, str] | None, principal: str | None) -> tuple[Workload, str]:
    """The peer as far as a verified `principal` vouches for it, and the service it named: with no
    principal nothing is believed; metadata naming another namespace than the certificate is dropped."""
    if not principal:
        return Workload(), UNKNOWN
    namespace = spiffe_namespace(principal)
    if decoded is None or decoded[0].namespace not in (UNKNOWN, namespace):
        return Workload(namespace=namespace or UNKNOWN, principal=principal), UNKNOWN
    said, service = decoded
    return Workload(said.workload, namespace or said.namespace, principal, said.app, said.version), service


@lru_cache(maxsize=1024)
def believed(metadata: bytes, principal: str) -> tuple[Workload, str]:
    """`trusted(decode(metadata))`, both engines' one way to read a verified peer's header: decoded
    once per value and principal, since a peer sends the same on every request (~7 µs each time
    otherwise). The Workload is shared: read it, never change it."""
    return trusted(decode(metadata) if metadata else None, principal)


def declared(backend: Backend) -> Workload:
    """What a policy backend says it is (`workload:`, `version:`), for hops without peer metadata;
    with `tls: mesh` its `identity` is what the handshake verified, so it names the principal."""
    principal = backend.identity if backend.tls == "mesh" and backend.identity else UNKNOWN
    namespace = spiffe_namespace(principal) or UNKNOWN
    workload = backend.workload or UNKNOWN
    return Workload(workload, namespace, principal, workload, backend.version or UNKNOWN)
