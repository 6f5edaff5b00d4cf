"""What the mitmproxy engine records of each request (meshlet.proxy.mitm.exchange, routing), hook
by hook on test flows: how an `error` hook reads as what the client got, and the peer metadata
exchange. End to end, on both engines: tests/integration/*/test_*telemetry*.py."""

from __future__ import annotations

import asyncio

import pytest
from mitmproxy import flow as mflow
from mitmproxy import http, tcp
from mitmproxy.connection import ConnectionState
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import tflow
from prometheus_client import CollectorRegistry
from test_proxy_addon import flow

from meshlet.proxy.mitm.exchange import CLIENT_RESET, KEY, failure, grpc_status
from meshlet.proxy.mitm.routing import Routing
from meshlet.proxy.mitm.strict import Strict
from meshlet.proxy.peermeta import HEADER_NAME
from meshlet.proxy.state import PolicyState, compile_policy
from meshlet.telemetry.outcome import Workload
from meshlet.telemetry.proxy import ProxyMetrics

FRONTEND = "spiffe://cluster.local/ns/default/sa/frontend"
REVIEWS = "spiffe://cluster.local/ns/default/sa/reviews"
POLICY = f"""\
apiVersion: meshlet.dev/v1alpha1
kind: TrafficPolicy
metadata: {{name: reviews}}
spec:
  host: reviews
  backends:
    plain: {{address: "127.0.0.1:9081", workload: reviews-plain, version: v1}}
    mesh: {{address: "127.0.0.1:9082", tls: mesh, identity: "{REVIEWS}"}}
  routes:
    - name: to-mesh
      match: {{headers: {{x-mesh: "1"}}}}
      to: [{{backend: mesh}}]
    - name: to-plain
      to: [{{backend: plain}}]
"""
ME = Workload("frontend", "default", FRONTEND, "frontend", "v3")


def routing(identity: str = "", server_identity: str = "") -> Routing:
    addon = Routing(PolicyState(compile_policy(POLICY, 1)), ProxyMetrics(CollectorRegistry(), "istio", ME))
    addon.open_upstreams.update({("127.0.0.1", 9081): 1, ("127.0.0.1", 9082): 1})  # known up: no probe
    addon.peer_identity = lambda client: identity
    addon.server_identity = lambda server: server_identity
    return addon


def requests_total(addon: Routing, **labels: str) -> float:
    return sum(
        s.value for m in addon.metrics.registry.collect() for s in m.samples
        if s.name == "meshlet_requests_total" and labels.items() <= s.labels.items()
    )


def inbound(**headers: str) -> http.HTTPFlow:
    f = flow(**headers)
    f.client_conn.proxy_mode = ProxyMode.parse("reverse:http://127.0.0.1:8080@15006")
    return f


def field_values(message: http.Message) -> list[bytes]:
    return [v for n, v in message.data.headers.fields if n.lower() == HEADER_NAME.encode()]


class TestWhatTheClientGot:
    """mitmproxy's `error` hook: the flow as mitmproxy leaves it says what reached the client."""

    def failed(self, message: str, response: http.Response | None = None, client_open: bool = True,
               connected: bool = True) -> http.HTTPFlow:
        f = tflow.tflow()
        f.response, f.error = response, mflow.Error(message)
        f.client_conn.state = ConnectionState.OPEN if client_open else ConnectionState.CLOSED
        if not connected:
            f.server_conn.timestamp_tcp_setup = None
        return f

    def test_mitmproxy_still_says_what_failure_reads(self):
        """`failure` reads mitmproxy's message for a stream the client reset: fails loudly if it moves."""
        import inspect

        from mitmproxy.proxy.layers.http import _http2

        assert f'f"{CLIENT_RESET} (' in inspect.getsource(_http2)

    def test_a_client_that_left_first_got_nothing(self):
        assert failure(self.failed("Client disconnected.", client_open=False)) == (0, "DC")
        assert failure(self.failed("stream reset by client (CANCEL)")) == (0, "DC")  # HTTP/2: one stream

    def test_a_response_whose_head_went_out_keeps_its_status(self):
        streamed = tflow.tresp(status_code=206)
        streamed.stream = True
        assert failure(self.failed("Client disconnected.", streamed, client_open=False)) == (206, "DC")
        assert failure(self.failed("server closed connection", streamed)) == (206, "UC")

    def test_a_response_held_back_never_reached_the_client(self):
        # meshlet's buffered client had the answer while the client went away: nothing was sent
        assert failure(self.failed("Client disconnected.", tflow.tresp(), client_open=False)) == (0, "DC")

    def test_a_live_client_got_mitmproxys_502(self):
        assert failure(self.failed("server closed connection")) == (502, "UC")
        assert failure(self.failed("Connection refused", connected=False)) == (502, "UF")

    def test_a_flow_an_addon_killed_got_nothing(self):
        assert failure(self.failed(mflow.Error.KILLED_MESSAGE)) == (0, "-")

    def test_the_error_hook_counts_code_0_not_502(self):
        addon, f = routing(), flow()
        asyncio.run(addon.requestheaders(f))
        f.response, f.error = None, mflow.Error("Client disconnected.")
        f.client_conn.state = ConnectionState.CLOSED
        addon.error(f)
        assert requests_total(addon, code="0", response_flags="DC", backend="plain") == 1
        assert requests_total(addon, code="502") == 0
        attempts = addon.metrics.registry.get_sample_value("meshlet_upstream_requests_total", {
            "direction": "outbound", "route": "to-plain", "backend": "plain", "code": "0", "response_flags": "DC"})
        assert attempts == 1  # the attempt was cut short by the client, against its backend

    def test_grpc_status_comes_from_trailers_or_a_trailers_only_response(self):
        f = flow(content_type="application/grpc")
        f.request.http_version = "HTTP/2.0"  # gRPC is HTTP/2 only
        f.response = tflow.tresp(headers=http.Headers(content_type="application/grpc"))
        assert grpc_status(f) == -1  # ended without a status
        f.response.trailers = http.Headers(grpc_status="14")
        assert grpc_status(f) == 14
        f.response.trailers, f.response.headers["grpc-status"] = None, "5"
        assert grpc_status(f) == 5
        assert grpc_status(flow()) == -1  # not gRPC
        f.request.http_version = "HTTP/1.1"
        assert grpc_status(f) == -1


class TestPeerMetadata:
    def test_the_apps_header_never_leaves_and_only_mesh_attempts_carry_ours(self):
        addon = routing()
        plain, mesh = flow(x_meshlet_peer_metadata="workload=spoofed"), flow(x_mesh="1", x_meshlet_peer_metadata="x")
        asyncio.run(addon.requestheaders(plain))
        asyncio.run(addon.requestheaders(mesh))
        assert field_values(plain.request) == []
        assert field_values(mesh.request) == [b"workload=frontend;namespace=default;app=frontend;version=v3;service=reviews"]

    def test_a_mesh_answer_names_the_destination_only_as_far_as_its_certificate_vouches(self):
        addon, f = routing(server_identity=REVIEWS), flow(x_mesh="1")
        asyncio.run(addon.requestheaders(f))
        f.response = tflow.tresp()
        f.response.data.content = None
        f.response.headers[HEADER_NAME] = "workload=reviews-v2;namespace=default;version=v2"
        addon.responseheaders(f)
        assert field_values(f.response) == []  # the app never sees it
        assert f.metadata[KEY].peer == Workload("reviews-v2", "default", REVIEWS, "unknown", "v2")

    def test_without_mesh_mtls_the_policy_declares_the_destination(self):
        addon, f = routing(server_identity=REVIEWS), flow()
        asyncio.run(addon.requestheaders(f))
        f.response = tflow.tresp()
        f.response.headers[HEADER_NAME] = "workload=liar;namespace=default"
        addon.responseheaders(f)
        assert field_values(f.response) == []
        assert f.metadata[KEY].peer is None  # nothing vouched: what the policy declares stands
        assert f.metadata[KEY].other_side() == Workload("reviews-plain", "unknown", "unknown", "reviews-plain", "v1")

    def test_inbound_believes_a_verified_caller_and_answers_it_with_our_metadata(self):
        addon = routing(identity=FRONTEND)
        f = inbound(x_meshlet_peer_metadata="workload=frontend;namespace=default;app=fe;service=reviews.default")
        asyncio.run(addon.requestheaders(f))
        exchange = f.metadata[KEY]
        assert field_values(f.request) == []  # not for the app
        assert (exchange.peer, exchange.service, exchange.mtls) == (
            Workload("frontend", "default", FRONTEND, "fe", "unknown"), "reviews.default", True)
        f.response = tflow.tresp()
        f.response.headers[HEADER_NAME] = "workload=app-made-this-up"
        addon.responseheaders(f)
        assert field_values(f.response) == [b"workload=frontend;namespace=default;app=frontend;version=v3"]

    def test_inbound_believes_nothing_from_an_unverified_caller(self):
        addon, f = routing(), inbound(x_meshlet_peer_metadata="workload=frontend;namespace=default")
        asyncio.run(addon.requestheaders(f))
        exchange = f.metadata[KEY]
        assert field_values(f.request) == [] and exchange.peer is None and not exchange.mtls
        assert exchange.service == "unknown"
        f.response = tflow.tresp()
        f.response.headers[HEADER_NAME] = "workload=app"
        addon.responseheaders(f)
        assert field_values(f.response) == []


@pytest.mark.parametrize("make", [flow, inbound])
def test_a_malformed_request_is_counted_once_as_invalid(make):
    addon, f = routing(), make(x_nul="a\x00b")
    Strict(addon.metrics).requestheaders(f)
    asyncio.run(addon.requestheaders(f))
    addon.response(f)
    assert requests_total(addon) == 1 and requests_total(addon, route="invalid", response_flags="DPE") == 1
    assert addon.in_flight == 0


@pytest.mark.parametrize("scripts", [False, True])
def test_an_upgraded_connection_mitmproxy_relays_is_counted_with_its_requests_labels(scripts):
    addon, f = routing(), flow()
    addon.stream = not scripts  # addon scripts may read a TCP flow's messages: they are kept for them
    asyncio.run(addon.requestheaders(f))
    f.response = tflow.tresp(status_code=101)
    addon.response(f)  # no WebSocket reading (no addon scripts): mitmproxy relays the bytes next
    relayed = tflow.ttcpflow(client_conn=f.client_conn, messages=[])
    addon.tcp_start(relayed)
    for from_client, chunk in ((True, b"abc"), (False, b"defgh"), (True, b"ij")):
        relayed.messages.append(tcp.TCPMessage(from_client, chunk))
        addon.tcp_message(relayed)
    assert len(relayed.messages) == (3 if scripts else 0)  # without scripts nothing is kept per chunk
    addon.tcp_end(relayed)
    labels = {"reporter": "source", "destination_workload": "reviews-plain", "request_protocol": "tcp"}

    def total(name: str) -> float:
        return sum(s.value for m in addon.metrics.registry.collect() for s in m.samples
                   if s.name == name and labels.items() <= s.labels.items())

    assert (total("istio_tcp_received_bytes_total"), total("istio_tcp_sent_bytes_total")) == (5, 5)
    assert total("istio_tcp_connections_closed_total") == 1


def test_with_addon_scripts_a_websocket_read_as_messages_is_counted_at_its_end():
    addon, f = routing(), flow()
    asyncio.run(addon.requestheaders(f))
    f.response, f.websocket = tflow.tresp(status_code=101), tflow.twebsocket()
    addon.response(f)
    addon.websocket_end(f)
    from_client = sum(len(m.content) for m in f.websocket.messages if m.from_client)
    from_server = sum(len(m.content) for m in f.websocket.messages if not m.from_client)
    labels = {"reporter": "source", "destination_workload": "reviews-plain", "request_protocol": "tcp"}

    def total(name: str) -> float:
        return sum(s.value for m in addon.metrics.registry.collect() for s in m.samples
                   if s.name == name and labels.items() <= s.labels.items())

    assert total("istio_tcp_connections_closed_total") == 1
    assert (total("istio_tcp_received_bytes_total"), total("istio_tcp_sent_bytes_total")) == (from_client, from_server)
    assert from_client and from_server
    assert requests_total(addon, code="101") == 1  # the upgrade itself is a request
