"""Kubernetes integration: sidecar injection (file and admission webhook), the TrafficPolicy
CRD generated from the policy model, and applying/watching policies as custom resources.

Nothing on the request path imports this package; `kubernetes` is imported lazily by `kube`.
"""
