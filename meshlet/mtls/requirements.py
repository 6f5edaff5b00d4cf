"""What a policy asks of the sidecar's mesh identity, checked before the policy is accepted.

A sidecar started without an identity (`--identity` or `--identity-server`) cannot honour
`mtls.mode: STRICT` (every mesh peer would be refused at the handshake, so the workload goes
dark) nor originate mTLS to a `tls: mesh` backend (every request would fail upstream). Both
are refused when the policy is loaded — at start-up and on PUT /policy — rather than discovered
one failed request at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

from meshlet.policy import PolicyError, PolicyInvalid
from meshlet.policy.model import TrafficPolicy

HINT = ("the sidecar runs without an identity (start it with --identity DIR from `meshlet cert issue`, or with "
        "--identity-server URL)")


def identity_problems(policies: Sequence[TrafficPolicy]) -> list[PolicyError]:
    """Every place in `policies` that needs a workload identity, located at its mark."""
    problems = []
    for policy in policies:
        found = [
            PolicyError(b.mark, f"backend {b.name} has tls: mesh, which needs a mesh identity, but {HINT}")
            for b in policy.backends if b.tls == "mesh"
        ]
        if policy.mtls is not None and policy.mtls.mode == "STRICT":
            found.append(PolicyError(policy.mtls.mark, f"mtls.mode STRICT needs a mesh identity, but {HINT}"))
        problems.extend(sorted(found, key=lambda p: (p.mark.line, p.mark.column)))  # in line order, as the loader's
    return problems


def require_identity(policies: Sequence[TrafficPolicy], has_identity: bool) -> None:
    """Raise PolicyInvalid when `policies` need an identity the sidecar does not have."""
    if not has_identity:
        problems = identity_problems(policies)
        if problems:
            raise PolicyInvalid(problems)
