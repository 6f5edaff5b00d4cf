"""The identity service's metrics, defined once: certificates issued, requests refused by reason."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from meshlet.mtls.wire import REASONS


class IdentityMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.issued = Counter(
            "meshlet_identity_certificates_issued_total",
            "Workload certificates signed by `meshlet identity serve`.",
            registry=registry,
        )
        self.refused = Counter(
            "meshlet_identity_requests_refused_total",
            "Signing requests refused, by reason: no_token, unauthenticated (the API server did not accept the "
            "token, or not for audience meshlet), not_service_account, bad_request, bad_csr, identity_mismatch "
            "(the CSR asked for a name the token does not prove), rate_limited, review_failed (the API server "
            "could not be asked).",
            ["reason"],
            registry=registry,
        )
        for reason in REASONS:  # every series exists from the start, so rate() and alerts see the first one
            self.refused.labels(reason)
        self.signing_ca_expiry = Gauge(
            "meshlet_identity_signing_ca_expiry_timestamp_seconds",
            "Unix time at which the CA that signs now expires.",
            registry=registry,
        )
