"""Where inbound connections go and what the app learns of the caller (meshlet.proxy.inbound),
and the mitmproxy engine's addon that applies it, hook by hook on test flows."""

from __future__ import annotations

import asyncio

import pytest
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import tflow
from prometheus_client import CollectorRegistry

from meshlet.policy.model import Address
from meshlet.proxy.config import SidecarConfig
from meshlet.proxy.inbound import Refused, forwarded_for, inbound_target, plain_host
from meshlet.proxy.mitm.inbound import Inbound
from meshlet.proxy.mitm.routing import KEY, Routing
from meshlet.proxy.state import PolicyState, compile_policy
from meshlet.telemetry.proxy import ProxyMetrics

POD = SidecarConfig(outbound=Address("127.0.0.1", 15001), inbound=Address("::", 15006),
                    admin=Address("127.0.0.1", 15000), health=Address("::", 15020), app=Address("127.0.0.1", 8080))


@pytest.mark.parametrize(("original", "local", "expected"), [
    (("192.0.2.1", 9999), ("192.0.2.1", 15006), ("192.0.2.1", 9999)),  # the Pod IP, never 127.0.0.1
    (("::ffff:192.0.2.1", 9090), ("::ffff:192.0.2.1", 15006), ("192.0.2.1", 9090)),
    (("2001:db8::1", 8080), ("2001:db8::1", 15006), ("2001:db8::1", 8080)),
    (None, ("::ffff:192.0.2.1", 15006), ("192.0.2.1", 8080)),  # sent to :15006 itself: --app's port, same address
    (None, ("127.0.0.1", 15006), ("127.0.0.1", 8080)),  # local use: loopback stays loopback
])
def test_inbound_goes_to_the_address_the_caller_chose(original, local, expected):
    assert inbound_target(POD, original, local) == expected


@pytest.mark.parametrize("port", [15000, 15001, 15006, 15020])
def test_a_connection_sent_to_one_of_the_sidecars_own_ports_is_refused(port):
    refused = inbound_target(POD, ("192.0.2.1", port), ("192.0.2.1", 15006))
    assert isinstance(refused, Refused) and f"port {port} is the sidecar's own" in refused.reason


def test_an_app_elsewhere_is_still_reached_as_configured():
    config = SidecarConfig(app=Address("10.0.0.5", 8080))
    assert inbound_target(config, None, ("192.0.2.1", 15006)) == ("10.0.0.5", 8080)


def test_caller_addresses_are_plain():
    assert plain_host("::ffff:192.0.2.2") == "192.0.2.2" and plain_host("[2001:db8::2]") == "2001:db8::2"
    assert forwarded_for(("::ffff:192.0.2.2", 40000)) == "192.0.2.2" and forwarded_for(None) == "unknown"


def inbound_flow(peer: tuple[str, int] = ("192.0.2.2", 40000), **headers: str):
    f = tflow.tflow()
    f.client_conn.proxy_mode = ProxyMode.parse("reverse:http://127.0.0.1:8080@15006")
    f.client_conn.peername, f.client_conn.sockname = peer, ("192.0.2.1", 15006)
    f.request.host, f.request.port = "127.0.0.1", 8080
    for name, value in headers.items():
        f.request.headers[name.replace("_", "-")] = value
    return f


class TestInboundAddon:
    def test_requests_go_to_the_pod_address_with_the_sidecars_x_forwarded_for(self):
        f = inbound_flow(x_forwarded_for="127.0.0.1", forwarded="for=127.0.0.1", x_real_ip="127.0.0.1")
        Inbound(POD).requestheaders(f)
        assert (f.request.host, f.request.port) == ("192.0.2.1", 8080)  # no redirect record: --app's port
        assert f.request.headers.get_all("x-forwarded-for") == ["192.0.2.2"]
        assert "forwarded" not in f.request.headers and "x-real-ip" not in f.request.headers

    def test_outbound_requests_are_left_alone(self):
        f = tflow.tflow()
        f.request.headers["x-forwarded-for"] = "10.1.1.1"
        Inbound(POD).requestheaders(f)
        assert f.request.headers["x-forwarded-for"] == "10.1.1.1" and f.request.host == "address"


def test_inbound_refusals_by_mtls_are_counted_as_403():
    routing = Routing(PolicyState(compile_policy("", 1)), ProxyMetrics(CollectorRegistry()))
    f = inbound_flow()
    f.response = tflow.tresp(status_code=403)  # what the mTLS addon answers a peer not in `allow`
    asyncio.run(routing.requestheaders(f))
    routing.response(f)
    assert f.metadata[KEY].backend == "none" and routing.in_flight == 0
    labels = {"direction": "inbound", "route": "inbound", "backend": "none", "code": "403", "grpc_status": "",
              "response_flags": "UAEX"}
    assert routing.metrics.registry.get_sample_value("meshlet_requests_total", labels) == 1.0


def test_the_addon_fails_closed_when_the_destination_cannot_be_read(monkeypatch):
    import meshlet.proxy.mitm.inbound as addon

    def broken(client):
        raise AttributeError("module 'socket' has no attribute 'SOL_IPV6'")

    monkeypatch.setattr(addon, "original_destination", broken)
    f = inbound_flow()
    Inbound(POD).requestheaders(f)
    assert f.error is not None and f.request.host == "127.0.0.1"  # killed, not sent to the reverse target
