"""gRPC between two sidecars over mesh mTLS: the app's h2c becomes HTTP/2 over mTLS (ALPN `h2`)
between the sidecars and h2c again to the server, with the caller's SPIFFE ID on every call."""

from __future__ import annotations

import sys
from pathlib import Path

import grpc
import pytest
from mesh_support import FRONTEND, REVIEWS, make_mesh, run_sidecar, traffic_policy

sys.path.insert(0, str(Path(__file__).parents[1] / "sidecar"))

from grpc_support import Stub, channel_to, start_grpc_backend

pytestmark = pytest.mark.engines("lean")  # the mitmproxy engine relays h2c without policy


@pytest.fixture(scope="module")
def grpc_pair(tmp_path_factory, engine):
    mesh = make_mesh(tmp_path_factory.mktemp("mesh"))
    mesh.identity("a", FRONTEND)
    mesh.identity("b", REVIEWS)
    server, port = start_grpc_backend("reviews")
    b_policy = traffic_policy("self", "self", "127.0.0.1:9", mode="STRICT", allow=(FRONTEND,))
    try:
        with run_sidecar(b_policy, "--identity", str(mesh.root / "b"), app_port=port) as b:
            target = f"127.0.0.1:{b.inbound[1]}"
            a_policy = traffic_policy("reviews", "reviews", target, tls="mesh", identity=REVIEWS)
            with run_sidecar(a_policy, "--identity", str(mesh.root / "a")) as a:
                yield a, b
                assert "Traceback" not in a.stderr() + b.stderr()
    finally:
        server.stop(0)


def test_calls_cross_the_mtls_hop_as_http2_with_the_callers_identity(grpc_pair):
    a, _ = grpc_pair
    channel = channel_to(a.outbound, "reviews")
    stub = Stub(channel)
    try:
        assert stub.echo(b"hi", timeout=10) == f"reviews:hi:{FRONTEND}".encode()
        assert len(list(stub.count(b"200", timeout=10))) == 200
        assert list(stub.chat(iter([b"a", b"b"]), timeout=10)) == [b"reviews>a", b"reviews>b"]
        with pytest.raises(grpc.RpcError) as failed:
            stub.echo(b"fail", timeout=10)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        channel.close()


def test_a_plaintext_grpc_client_is_refused_by_the_strict_side(grpc_pair):
    _, b = grpc_pair
    channel = channel_to(b.inbound, "reviews")
    try:
        with pytest.raises(grpc.RpcError) as failed:
            Stub(channel).echo(b"hi", timeout=5)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE  # the connection was closed unanswered
    finally:
        channel.close()
