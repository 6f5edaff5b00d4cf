"""The routing addon's hooks, called directly on test flows (no sockets, no event loop server)."""

from __future__ import annotations

import asyncio

import pytest
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import tflow
from prometheus_client import CollectorRegistry

from meshlet.policy.model import Address, Backend, Metadata, Retries, Route, TrafficPolicy, WeightedBackend
from meshlet.proxy.mitm.routing import KEY, Routing, attempts_for, candidates, needs_pool
from meshlet.proxy.state import PolicyState, compile_policy
from meshlet.routing import Decision

POLICY = """\
apiVersion: meshlet.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: reviews}
spec:
  host: reviews
  backends:
    v1: {address: "127.0.0.1:9081"}
    v2: {address: "127.0.0.1:9082"}
  routes:
    - name: beta
      match: {headers: {x-group: beta}}
      to: [{backend: v2}]
    - name: slow
      match: {path: {prefix: /slow}}
      to: [{backend: v1}]
      timeout: 1s
"""


def routing(strict_hosts: bool = False) -> Routing:
    from meshlet.telemetry.proxy import ProxyMetrics

    addon = Routing(PolicyState(compile_policy(POLICY, 1)), ProxyMetrics(CollectorRegistry()), strict_hosts)
    addon.open_upstreams[("127.0.0.1", 9081)] = 1  # known up: no probe
    addon.open_upstreams[("127.0.0.1", 9082)] = 1
    return addon


def flow(host: str = "reviews", path: str = "/", **headers: str):
    f = tflow.tflow()
    f.request.host, f.request.port, f.request.path = host, 80, path
    f.request.headers.clear()
    f.request.headers["host"] = host
    for name, value in headers.items():
        f.request.headers[name.replace("_", "-")] = value
    return f


class TestRouting:
    def test_match_rewrites_upstream_keeps_host_header_and_streams(self):
        addon, f = routing(), flow(x_group="beta")
        asyncio.run(addon.requestheaders(f))
        assert (f.request.host, f.request.port, f.request.scheme) == ("127.0.0.1", 9082, "http")
        assert f.request.headers["host"] == "reviews"
        assert f.request.stream is True and f.response is None
        assert f.metadata[KEY].route == "beta" and f.metadata[KEY].backend == "v2"

    def test_unmatched_route_is_404_and_counted(self):
        addon, f = routing(), flow()
        asyncio.run(addon.requestheaders(f))
        assert f.response.status_code == 404 and b"no route for host 'reviews'" in f.response.content
        addon.response(f)
        assert addon.in_flight == 0
        sample = addon.metrics.registry.get_sample_value(
            "meshlet_requests_total", {"direction": "outbound", "route": "unmatched", "backend": "none", "code": "404", "grpc_status": "",
                                        "response_flags": "NR"}
        )
        assert sample == 1.0

    def test_unknown_host_passes_through_or_404_when_strict(self):
        loose, f = routing(), flow(host="example.org")
        asyncio.run(loose.requestheaders(f))
        assert f.response is None and f.request.host == "example.org" and f.request.stream is True
        strict, g = routing(strict_hosts=True), flow(host="example.org")
        asyncio.run(strict.requestheaders(g))
        assert g.response.status_code == 404

    def test_timeout_route_is_left_for_the_buffered_client(self):
        addon, f = routing(), flow(path="/slow/x")
        asyncio.run(addon.requestheaders(f))
        assert f.metadata[KEY].buffered is True
        assert not f.request.stream and f.request.host == "reviews"  # rewritten only when sent

    def test_inbound_is_streamed_to_the_app(self):
        addon, f = routing(), flow()
        f.client_conn.proxy_mode = ProxyMode.parse("reverse:http://127.0.0.1:8080@15006")
        asyncio.run(addon.requestheaders(f))
        assert f.request.stream is True and f.metadata[KEY].direction == "inbound"

    def test_each_request_is_finished_once(self):
        addon, f = routing(), flow(x_group="beta")
        asyncio.run(addon.requestheaders(f))
        assert addon.in_flight == 1
        addon.response(f)
        addon.error(f)
        assert addon.in_flight == 0


def decision(retries: Retries | None = None, timeout: float | None = None, tls: str = "none") -> Decision:
    backends = (Backend("a", Address("127.0.0.1", 1), tls), Backend("b", Address("127.0.0.1", 2)),
                Backend("c", Address("127.0.0.1", 3)))
    route = Route("r", (WeightedBackend("a", 10), WeightedBackend("b", 30), WeightedBackend("c", 60)),
                  timeout=timeout, retries=retries)
    policy = TrafficPolicy(Metadata("p"), "p", backends, (route,))
    return Decision(policy, route, backends[0])


def test_retries_go_to_the_other_backends_by_weight():
    assert [b.name for b in candidates(decision())] == ["a", "c", "b"]


@pytest.mark.parametrize(("method", "condition", "expected"), [
    ("GET", "connect-failure", 3), ("GET", "5xx", 3), ("GET", "reset", 1), ("POST", "connect-failure", 1),
    ("PUT", "5xx", 3), ("PATCH", "5xx", 1),
])
def test_attempts_only_for_idempotent_methods_and_listed_conditions(method, condition, expected):
    route = decision(Retries(2, ("connect-failure", "5xx"))).route
    assert attempts_for(route, method, condition) == expected


def test_buffered_client_only_when_a_deadline_or_replay_needs_it():
    assert not needs_pool(decision())
    assert not needs_pool(decision(Retries(1, ("connect-failure",))))
    assert needs_pool(decision(Retries(1, ("5xx",))))
    assert not needs_pool(decision(Retries(1, ("unavailable", "internal"))))  # gRPC: not the HTTP/1.1 client's
    assert needs_pool(decision(timeout=1.0))
    assert needs_pool(decision(timeout=1.0, tls="mesh"))  # the buffered client speaks mesh mTLS too


def test_h2c_upgrade_is_served_as_http11():
    from meshlet.proxy.mitm.h2c import H2c

    f = flow(upgrade="h2c", connection="Upgrade, HTTP2-Settings", http2_settings="AAMAAABkAAQAAP__")
    H2c().requestheaders(f)
    assert not {"upgrade", "connection", "http2-settings"} & {name.lower() for name in f.request.headers}
    g = flow(upgrade="websocket", connection="Upgrade")
    H2c().requestheaders(g)
    assert g.request.headers["upgrade"] == "websocket"  # WebSocket upgrades are left alone
