"""Real certificates for the mTLS unit tests, minted by the production builders."""

from __future__ import annotations

import datetime as dt

from meshlet.mtls.ca import Authority, Issued, issue_workload, new_authority

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)
FRONTEND = "spiffe://cluster.local/ns/default/sa/frontend"
REVIEWS = "spiffe://cluster.local/ns/default/sa/reviews"

_cache: dict[str, Authority] = {}


def authority(name: str = "mesh") -> Authority:
    """One CA per name per test session: key generation is cheap, but the tests read better."""
    if name not in _cache:
        _cache[name] = new_authority(NOW - dt.timedelta(days=1), name=f"meshlet {name} CA")
    return _cache[name]


def workload(spiffe_id: str = FRONTEND, ca: str = "mesh", issued_at: dt.datetime = NOW, ttl: float = 3600) -> Issued:
    return issue_workload(authority(ca), spiffe_id, issued_at, ttl)
