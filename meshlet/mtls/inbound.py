"""Which inbound mTLS rules apply, and which backends are reached over mesh TLS: read per
connection from the running policies by both engines, so an apply takes effect at the next
handshake or request.

The inbound rules belong to the workload, not to whichever policy came first: a policy's
`mtls` section with a `selector` applies to the workloads whose labels carry all of it, one
without a selector is the namespace's default, as Istio's PeerAuthentication. Validation
refuses two defaults in a namespace and two sections with one selector (meshlet.policy.checks);
`mtls_conflicts` adds, for a running sidecar, two different selectors that both pick its workload.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from meshlet.policy import PolicyError
from meshlet.policy.model import Backend, Mtls, TrafficPolicy

PEER_IDENTITY_HEADER = "x-meshlet-peer-identity"  # the verified caller, set by the sidecar only
DEFAULT_MTLS = Mtls()  # no policy says otherwise: PERMISSIVE, like Istio's default
Labels = Mapping[str, str]
NO_LABELS: Labels = {}


def selects(mtls: Mtls, workload_labels: Labels) -> bool:
    """A selector picks the workloads whose labels it matches (Kubernetes' label selector rules)."""
    return mtls.selector is not None and mtls.selector.matches(workload_labels)


def inbound_mtls(policies: Sequence[TrafficPolicy], workload_labels: Labels = NO_LABELS) -> Mtls:
    """This workload's inbound settings: the mtls section whose selector picks its labels, else
    the namespace default (a section without selector), else PERMISSIVE."""
    default = None
    for policy in policies:
        mtls = policy.mtls
        if mtls is None:
            continue
        if mtls.selector is None:
            default = default or mtls
        elif selects(mtls, workload_labels):
            return mtls
    return default or DEFAULT_MTLS


def mtls_conflicts(policies: Sequence[TrafficPolicy], workload_labels: Labels) -> list[PolicyError]:
    """Two selectors that both pick this workload, each after the first located at its mark."""
    chosen: list[Mtls] = [p.mtls for p in policies if p.mtls is not None and selects(p.mtls, workload_labels)]
    if len(chosen) < 2:
        return []
    labels = ", ".join(f"{k}={v}" for k, v in sorted(workload_labels.items()))
    return [
        PolicyError(mtls.mark, f"mtls.selector {mtls.selector} and the one at {chosen[0].mark} {chosen[0].selector} "
                    f"both select this workload ({labels}); make them select different workloads")
        for mtls in chosen[1:]
    ]


def mesh_backends(policies: Sequence[TrafficPolicy]) -> dict[tuple[str, int], Backend]:
    """(host, port) → backend for every `tls: mesh` backend, the lookup outbound TLS needs."""
    return {(b.address.host, b.address.port): b for p in policies for b in p.backends if b.tls == "mesh"}
