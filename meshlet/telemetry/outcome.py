"""What the engines tell telemetry about a request: one `Outcome` per request, as its client saw
it, and a `Workload` for each side of a mesh hop.

Both engines build the same records, so metrics, the access log and Istio-style labels are
computed once (meshlet.telemetry.proxy, meshlet.telemetry.accesslog) whatever the engine.
Response flags are Envoy's names (https://www.envoyproxy.io/docs/envoy/latest/configuration/
observability/access_log/usage#config-access-log-format-response-flags), so dashboards and
queries written for Istio read them unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

UNKNOWN = "unknown"
NO_FLAGS = "-"

# Envoy's response flags, the ones meshlet sets.
DOWNSTREAM_DISCONNECT = "DC"  # the client went away before it had a response
UPSTREAM_CONNECT_FAILURE = "UF"
UPSTREAM_CONNECTION_TERMINATION = "UC"  # the backend closed or reset before (or while) answering
UPSTREAM_TIMEOUT = "UT"  # the route's timeout
RETRIES_EXHAUSTED = "URX"
UNAUTHORIZED = "UAEX"  # refused by mTLS mode or the allow list (a 403 from the sidecar)
NO_ROUTE = "NR"
DOWNSTREAM_PROTOCOL_ERROR = "DPE"


def with_flag(flags: str, flag: str) -> str:
    """`flags` plus `flag`, comma-joined as Envoy prints several."""
    if flags == NO_FLAGS or not flags:
        return flag
    return flags if flag in flags.split(",") else f"{flags},{flag}"


@dataclass(slots=True)
class Workload:
    """One side of a mesh hop, as Istio labels it. `principal` is a SPIFFE ID and only ever comes
    from a verified certificate; the rest from the workload's own flags or the peer's metadata."""

    workload: str = UNKNOWN
    namespace: str = UNKNOWN
    principal: str = UNKNOWN
    app: str = UNKNOWN
    version: str = UNKNOWN


@dataclass(slots=True)
class Outcome:
    """One request, built once where the engine finishes it. `code` 0 means no response reached
    the client; `peer` is the other side of the hop (the destination outbound, the source inbound)."""

    direction: str  # outbound | inbound
    route: str
    backend: str
    service: str  # the policy host outbound; inbound, the host the caller's sidecar routed by
    code: int
    flags: str = NO_FLAGS
    seconds: float = 0.0
    start: float = 0.0  # wall clock (time.time()) when the request head arrived
    method: str = ""
    authority: str = ""
    path: str = ""
    protocol: str = "HTTP/1.1"  # HTTP/1.1 | HTTP/2
    grpc_status: int = -1  # -1: not a gRPC call, or it ended without a status
    bytes_received: int = 0  # request body bytes from the client
    bytes_sent: int = 0  # response body bytes to the client
    upstream_host: str = ""  # host:port of the last attempt
    request_id: str = ""
    peer_identity: str = ""  # the downstream peer's verified SPIFFE ID, if any
    peer: Workload | None = None
    mtls: bool = False  # inbound: the caller was verified by mesh mTLS
