"""Which inbound mTLS rules apply, and which backends are reached over mesh TLS: read per
connection from the running policies by both engines, so an apply takes effect at the next
handshake or request."""

from __future__ import annotations

from collections.abc import Sequence

from meshlet.policy.model import Backend, Mtls, TrafficPolicy

PEER_IDENTITY_HEADER = "x-meshlet-peer-identity"  # the verified caller, set by the sidecar only
DEFAULT_MTLS = Mtls()  # no policy says otherwise: PERMISSIVE, like Istio's default


def inbound_mtls(policies: Sequence[TrafficPolicy]) -> Mtls:
    """The inbound settings: the first policy that has an `mtls` section, else PERMISSIVE."""
    return next((p.mtls for p in policies if p.mtls is not None), DEFAULT_MTLS)


def mesh_backends(policies: Sequence[TrafficPolicy]) -> dict[tuple[str, int], Backend]:
    """(host, port) → backend for every `tls: mesh` backend, the lookup outbound TLS needs."""
    return {(b.address.host, b.address.port): b for p in policies for b in p.backends if b.tls == "mesh"}
