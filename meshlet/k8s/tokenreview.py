"""Who a bearer token belongs to, as the Kubernetes API server says (authentication.k8s.io/v1 TokenReview).

The identity service never decodes a token itself: a projected ServiceAccount token is checked by
the API server (signature, expiry, audience, and that its Pod and ServiceAccount still exist).
The service's own ServiceAccount needs `create` on tokenreviews: the chart binds it to
`system:auth-delegator`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Review:
    """A TokenReview's status, as much of it as the signer reads."""

    authenticated: bool
    username: str = ""  # system:serviceaccount:NAMESPACE:NAME for a ServiceAccount token
    audiences: tuple[str, ...] = ()  # those of the requested ones the token is valid for
    error: str = ""


def token_reviewer(audience: str, context: str | None = None, kubeconfig: str | None = None
                   ) -> Callable[[str], Review]:
    """A function asking the API server about one token for `audience` (kubeconfig, else in-cluster);
    KubeError when the API cannot be reached or refuses the review itself."""
    from kubernetes import client

    from meshlet.k8s.kube import api_call, connect_client

    api_client, _ = connect_client(context, kubeconfig)
    api = client.AuthenticationV1Api(api_client)

    def review(token: str) -> Review:
        body = client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token, audiences=[audience]))
        with api_call("tokenreview"):
            status = api.create_token_review(body).status
        user = status.user
        return Review(bool(status.authenticated), (user.username or "") if user else "",
                      tuple(status.audiences or ()), status.error or "")

    return review
