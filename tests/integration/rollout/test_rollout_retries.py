"""A canary whose 5xx a retry hides from every client is still judged by its own answers.

Rollout analysis reads the upstream attempts (meshlet_upstream_requests_total), not what clients
got: with `retries` on the route, each 5xx of the canary is retried to the stable backend and
the client sees a 200, yet the canary fails its analyses and is rolled back. Judged by the
clients' answers, it would have held for want of requests and reached 100%.
"""

from __future__ import annotations

import pytest
from rollout_support import backends, cli, metric, reviews, rollout_route, run_sidecar, traffic, wait_for

pytestmark = pytest.mark.timeout(120)
__all__ = ["backends"]  # the module-scoped fixture
RETRIED = "      retries: {attempts: 1, retryOn: [5xx]}\n"


def test_canary_5xx_hidden_by_retries_rolls_back(backends):
    route = rollout_route(steps="[20, 50, 100]") + RETRIED
    with run_sidecar(reviews(backends, route, canary="bad")) as sidecar:
        assert cli(sidecar, "start").returncode == 0
        with traffic(sidecar) as seen:
            final = wait_for(sidecar, lambda s: s["phase"] != "Progressing", "the rollback")
        assert (final["phase"], final["weight"]) == ("RolledBack", 0)
        assert "success rate" in final["history"][-1]["reason"]
        assert set(seen) == {"v1"}  # no client saw the canary's 5xx: the retries answered from stable
        canary_5xx = metric(sidecar, "meshlet_upstream_requests_total", route="canary", backend="v2", code="500")
        assert canary_5xx is not None and canary_5xx >= 5
        assert metric(sidecar, "meshlet_requests_total", route="canary", backend="v2", code="500") is None
