"""Who can reach what: listener sockets (meshlet.proxy.listen), the loopback-only control API,
the read-only health handler and the internal headers only a worker's private API obeys."""

from __future__ import annotations

import asyncio
import socket

import pytest
from prometheus_client import CollectorRegistry

from meshlet.policy.model import Address
from meshlet.proxy.admin import GENERATION_HEADER, WEIGHTS_HEADER, AdminApi, read_only
from meshlet.proxy.config import SidecarConfig, config_from_json, config_to_json
from meshlet.proxy.httpserver import Request
from meshlet.proxy.listen import bind_listeners, claim_port, is_loopback
from meshlet.proxy.state import PolicyState, compile_policy
from meshlet.telemetry.proxy import ProxyMetrics

POLICY = """\
apiVersion: meshlet.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: reviews}
spec:
  host: reviews
  backends: {v1: {address: "127.0.0.1:9081"}, v2: {address: "127.0.0.1:9082"}}
  routes:
    - name: canary
      to: [{backend: v1, weight: 90}, {backend: v2, weight: 10}]
"""


def close_all(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


class TestListeners:
    def test_every_listener_reuses_addresses_and_only_workers_share_ports(self):
        first = bind_listeners(Address("127.0.0.1", 0))
        try:
            assert first[0].getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
            assert not first[0].getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
            first[0].listen()
            port = first[0].getsockname()[1]
            with pytest.raises(OSError, match="in use"):
                claim_port(Address("127.0.0.1", port))  # someone listens: a second sidecar must not start
        finally:
            close_all(first)
        workers = bind_listeners(Address("127.0.0.1", port), reuse_port=True)
        workers += bind_listeners(Address("127.0.0.1", port), reuse_port=True)
        close_all(workers)
        assert claim_port(Address("127.0.0.1", 0)).port > 0

    def test_all_addresses_are_one_dual_stack_socket_and_localhost_both_loopbacks(self):
        (dual,) = bind_listeners(Address("::", 0))
        both = bind_listeners(Address("localhost", 0))
        try:
            assert dual.family == socket.AF_INET6 and dual.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
            assert [s.getsockname()[0] for s in both] == ["127.0.0.1", "::1"]
            assert both[0].getsockname()[1] == both[1].getsockname()[1]
            dual.listen()
            with socket.create_connection(("127.0.0.1", dual.getsockname()[1]), timeout=5):
                pass  # IPv4 reaches the dual-stack socket
        finally:
            close_all([dual, *both])

    def test_accepted_connections_get_tcp_nodelay(self):
        """asyncio sets TCP_NODELAY only when the socket's proto is TCP: else ~40 ms per request."""

        async def accepted_nodelay() -> int:
            seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

            async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                sock = writer.get_extra_info("socket")
                seen.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                writer.close()

            (sock,) = bind_listeners(Address("127.0.0.1", 0))
            server = await asyncio.start_server(on_connect, sock=sock)
            async with server:
                _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
                try:
                    return await asyncio.wait_for(seen, 5)
                finally:
                    writer.close()

        assert asyncio.run(accepted_nodelay()) == 1

    @pytest.mark.parametrize(("host", "loopback"), [
        ("127.0.0.1", True), ("127.9.9.9", True), ("::1", True), ("[::1]", True), ("localhost", True),
        ("0.0.0.0", False), ("::", False), ("192.0.2.1", False), ("example.com", False),
    ])
    def test_loopback(self, host, loopback):
        assert is_loopback(host) is loopback


class TestControlApi:
    @pytest.mark.parametrize("admin", ["0.0.0.0", "::", "192.0.2.1"])
    def test_a_non_loopback_admin_is_refused_with_what_to_use_instead(self, admin):
        with pytest.raises(ValueError, match=r"listens on loopback only .*--health HOST:PORT"):
            SidecarConfig(admin=Address(admin, 15000))

    def test_health_labels_and_control_survive_the_hand_off_to_workers(self):
        config = SidecarConfig(health=Address("::", 15020), control="/tmp/x/worker-1.sock",
                               workload_labels=(("app", "reviews"),))
        assert config_from_json(config_to_json(config)) == config
        assert config.own_ports == {15001, 15006, 15000, 15020}

    @staticmethod
    def api(internal: bool = False) -> AdminApi:
        state = PolicyState(compile_policy(POLICY, 1))
        return AdminApi(state, ProxyMetrics(CollectorRegistry()), lambda: True, internal=internal)

    def test_the_health_port_reads_health_and_metrics_and_nothing_else(self):
        handler = read_only(self.api())

        def call(method: str, target: str) -> int:
            return asyncio.run(handler(Request(method, target, {}, POLICY.encode()))).status

        assert [call("GET", p) for p in ("/healthz", "/readyz", "/metrics")] == [200, 200, 200]
        assert [call("GET", p) for p in ("/policy", "/certs", "/rollouts", "/rollouts/reviews")] == [404] * 4
        assert call("PUT", "/policy") == 404 and call("POST", "/rollouts/reviews/promote") == 404
        assert call("PUT", "/metrics") == 405

    def test_internal_headers_are_obeyed_only_on_a_workers_private_api(self):
        headers = {GENERATION_HEADER: "1000", WEIGHTS_HEADER: '{"reviews": {"canary": {"v2": 100}}}'}
        public, private = self.api(), self.api(internal=True)
        for api in (public, private):
            reply = asyncio.run(api(Request("PUT", "/policy", headers, POLICY.encode())))
            assert reply.status == 200, reply.body
        assert public.state.generation == 2 and public.state.current.weights == {}
        assert public.metrics.registry.get_sample_value("meshlet_policy_applies_total", {"result": "ok"}) == 1.0
        assert private.state.generation == 1000 and private.state.current.weights != {}
