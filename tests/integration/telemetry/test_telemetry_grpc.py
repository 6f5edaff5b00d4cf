"""gRPC calls in Istio's labels: request_protocol "grpc" with the call's grpc_response_status, and
peer metadata exchanged on HTTP/2 streams between two sidecars (grpcio clients and servers).

The lean engine only: the mitmproxy engine relays cleartext HTTP/2 (h2c, what grpcio's insecure
channels speak) at L4, without policy (README: engine differences).
"""

from __future__ import annotations

import grpc
import pytest
from grpc_support import Stub, channel_to, start_grpc_backend
from telemetry_support import FRONTEND_SIDE, REVIEWS_SIDE, mesh_pair, samples, side

pytestmark = [pytest.mark.engines("lean"), pytest.mark.timeout(120)]
ISTIO = "istio_requests_total"


@pytest.fixture(scope="module")
def grpc_app():
    server, port = start_grpc_backend("reviews")
    yield port
    server.stop(0)


@pytest.fixture(scope="module")
def pair(identities, grpc_app, engine):
    with mesh_pair(identities.root, grpc_app) as pair:
        yield pair


def test_grpc_calls_over_the_mesh_carry_their_status_and_both_sides(pair):
    a, b = pair
    with channel_to(a.outbound, "reviews") as channel:
        stub = Stub(channel)
        assert stub.echo(b"hi", timeout=10).startswith(b"reviews:hi:")
        with pytest.raises(grpc.RpcError) as failed:
            stub.echo(b"fail", timeout=10)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    for sidecar, reporter in ((a, "source"), (b, "destination")):
        calls = samples(sidecar, ISTIO, reporter=reporter)
        assert sorted((s.labels["grpc_response_status"], s.value) for s in calls) == [("0", 1), ("14", 1)], reporter
        for call in calls:
            assert {k: v for k, v in call.labels.items() if k.startswith(("source_", "destination_"))} == {
                **side("source", FRONTEND_SIDE), **side("destination", REVIEWS_SIDE), "destination_service": "reviews",
                "destination_service_name": "reviews", "destination_service_namespace": "default",
            }
            assert (call.labels["request_protocol"], call.labels["response_code"]) == ("grpc", "200")
    assert sorted(s.labels["grpc_status"] for s in samples(a, "meshlet_requests_total")) == ["0", "14"]
