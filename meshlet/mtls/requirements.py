"""What a policy asks of this sidecar, checked before the policy is accepted.

A sidecar started without an identity (`--identity` or `--identity-server`) cannot honour
`mtls.mode: STRICT` (every mesh peer would be refused at the handshake, so the workload goes
dark) nor originate mTLS to a `tls: mesh` backend (every request would fail upstream). And this
workload's inbound rules must be one mtls section, not two selectors that both pick it. All are
refused when the policy is loaded — at start-up and on PUT /policy — rather than discovered one
failed request at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

from meshlet.mtls.inbound import NO_LABELS, Labels, inbound_mtls, mtls_conflicts
from meshlet.policy import PolicyError, PolicyInvalid
from meshlet.policy.model import TrafficPolicy

HINT = ("the sidecar runs without an identity (start it with --identity DIR from `meshlet cert issue`, or with "
        "--identity-server URL)")


def identity_problems(policies: Sequence[TrafficPolicy], workload_labels: Labels = NO_LABELS) -> list[PolicyError]:
    """Every place in `policies` that needs a workload identity, located at its mark: mesh
    backends, and STRICT where it is this workload's inbound mode."""
    mine = inbound_mtls(policies, workload_labels)
    problems = []
    for policy in policies:
        found = [
            PolicyError(b.mark, f"backend {b.name} has tls: mesh, which needs a mesh identity, but {HINT}")
            for b in policy.backends if b.tls == "mesh"
        ]
        if policy.mtls is mine and mine.mode == "STRICT":
            found.append(PolicyError(mine.mark, f"mtls.mode STRICT needs a mesh identity, but {HINT}"))
        problems.extend(sorted(found, key=lambda p: (p.mark.line, p.mark.column)))  # in line order, as the loader's
    return problems


def require_identity(
    policies: Sequence[TrafficPolicy], has_identity: bool, workload_labels: Labels = NO_LABELS
) -> None:
    """Raise PolicyInvalid when `policies` need an identity the sidecar does not have, or give
    this workload two inbound mtls sections."""
    problems = mtls_conflicts(policies, workload_labels)
    if not has_identity:
        problems += identity_problems(policies, workload_labels)
    if problems:
        raise PolicyInvalid(problems)
