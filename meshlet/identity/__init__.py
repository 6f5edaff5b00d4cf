"""`meshlet identity serve`: the cluster's workload certificate signer.

A sidecar sends a CSR and its projected ServiceAccount token; the service asks the Kubernetes
API who the token belongs to (TokenReview) and signs a short-lived certificate naming exactly
that ServiceAccount's SPIFFE ID. `signer` is the pure decision, `ratelimit` the per-identity
budget, `service` ties them to the CA dir, `server` is the HTTPS edge.
"""
