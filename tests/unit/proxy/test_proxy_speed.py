"""What meshlet's own code costs per request: `decide()` and the addon hooks on `tflow` flows.

pytest-benchmark prints the figures (goal: ≤ 20 µs per request of meshlet's code); nothing here
asserts a time, only that the benchmarked calls did the right thing. The rounds are capped in
pyproject.toml (`--benchmark-max-time`) so `make test` stays fast; for steadier figures:
`.venv/bin/pytest tests/unit/proxy/test_proxy_speed.py --benchmark-max-time=2`.

`LeanAddons` (mitmproxy's hook dispatch without the per-hook walk of the chain) is tested here
too: it overrides mitmproxy's AddonManager, so these tests fail loudly if those internals move.
"""

from __future__ import annotations

import logging
from collections.abc import Coroutine
from typing import Any

from mitmproxy import hooks, http
from mitmproxy.addonmanager import AddonManager
from mitmproxy.proxy.layers.http import HttpRequestHeadersHook, HttpResponseHook
from mitmproxy.test import taddons, tflow
from prometheus_client import CollectorRegistry
from test_proxy_addon import flow
from test_proxy_addon import routing as beta_routing

from meshlet.proxy.mitm.dispatch import LeanAddons
from meshlet.proxy.mitm.h2c import H2c
from meshlet.proxy.mitm.routing import KEY, Routing
from meshlet.proxy.state import PolicyState, compile_policy
from meshlet.routing import Decision, decide
from meshlet.telemetry.proxy import ProxyMetrics

CANARY = """\
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
    - name: canary
      to: [{backend: v1, weight: 90}, {backend: v2, weight: 10}]
"""


def complete(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run a hook that must not suspend (backend known up: no probe) without an event loop."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    raise AssertionError("the hook awaited on a path that should need no I/O")


def canary_routing() -> Routing:
    addon = Routing(PolicyState(compile_policy(CANARY, 1)), ProxyMetrics(CollectorRegistry()))
    addon.open_upstreams.update({("127.0.0.1", 9081): 1, ("127.0.0.1", 9082): 1})  # known up: no probe
    return addon


def one_request(addon: Routing, h2c: H2c, f: http.HTTPFlow, response: http.Response) -> None:
    """Every meshlet hook of one streamed request, in mitmproxy's order."""
    f.metadata.clear()
    f.response = None
    h2c.requestheaders(f)
    complete(addon.requestheaders(f))
    complete(addon.request(f))
    f.response = response
    addon.responseheaders(f)
    addon.response(f)


class TestSpeed:
    def test_decide_weighted_split(self, benchmark):
        from meshlet.proxy.mitm.routing import request_view

        table = canary_routing().state.table
        view = request_view(flow(path="/reviews/1", user_agent="wrk"))
        decision = benchmark(decide, table, view)
        assert isinstance(decision, Decision) and decision.route.name == "canary"
        assert decision.backend.name in {"v1", "v2"}

    def test_request_view_and_decide(self, benchmark):
        from meshlet.proxy.mitm.routing import request_view

        table, f = canary_routing().state.table, flow(x_group="beta", cookie="a=1; b=2")
        decision = benchmark(lambda: decide(table, request_view(f)))
        assert decision.route.name == "beta" and decision.backend.name == "v2"

    def test_request_view_reads_raw_fields_like_the_headers_api(self):
        from meshlet.proxy.mitm.routing import request_view

        f = flow(x_group="beta")
        f.request.headers.add("X-Group", "second")  # the first value wins
        f.request.headers.add("Cookie", "ab=B; x=1")
        f.request.headers.add("cookie", "ab=A; y=2")  # HTTP/2 splits cookies: joined, first name wins
        f.request.headers.add("X-Name", "caf\u00e9")
        view = request_view(f)
        assert view.authority == "reviews" and view.headers["x-group"] == "beta"
        assert view.headers["x-name"] == f.request.headers["x-name"] == "caf\u00e9"
        assert view.cookies == {"ab": "B", "x": "1", "y": "2"}
        f.request.http_version = "HTTP/2.0"
        f.request.authority = "reviews.default:9080"
        assert request_view(f).authority == "reviews.default:9080"

    def test_all_hooks_of_one_request(self, benchmark):
        addon, h2c, f = canary_routing(), H2c(), flow(path="/reviews/1")
        response, calls = tflow.tresp(), []

        def request() -> None:
            calls.append(1)
            one_request(addon, h2c, f, response)

        benchmark(request)
        assert f.metadata[KEY].route == "canary" and f.metadata[KEY].done
        assert (f.request.host, f.request.port) in {("127.0.0.1", 9081), ("127.0.0.1", 9082)}
        assert f.request.stream is True and f.response.stream is True
        assert addon.in_flight == 0
        counted = [
            addon.metrics.registry.get_sample_value(
                "meshlet_requests_total", {"direction": "outbound", "route": "canary", "backend": b, "code": "200",
                                           "grpc_status": "", "response_flags": "-"}
            ) or 0.0
            for b in ("v1", "v2")
        ]
        assert sum(counted) == len(calls)  # every request counted once, on one of the split's backends
        if len(calls) >= 100:
            assert counted[0] > counted[1] > 0  # 90/10

    def test_lean_dispatch_of_one_request(self, benchmark):
        """The same hooks, dispatched the way the sidecar does (through LeanAddons)."""
        addon, h2c, f = canary_routing(), H2c(), flow(path="/reviews/1")
        response = tflow.tresp()
        manager = lean_manager(h2c, addon)

        def dispatch() -> None:
            f.metadata.clear()
            f.response = None
            complete(manager.handle_lifecycle(HttpRequestHeadersHook(f)))
            f.response = response
            complete(manager.handle_lifecycle(HttpResponseHook(f)))

        benchmark(dispatch)
        assert f.metadata[KEY].done and addon.in_flight == 0


def lean_manager(*addons: object) -> LeanAddons:
    """A LeanAddons on mitmproxy's test master (taddons), holding `addons`."""
    manager = LeanAddons(taddons.context().master)
    manager.add(*addons)
    return manager


class Recorder:
    def __init__(self, name: str = "recorder") -> None:
        self.name = name
        self.calls: list[str] = []

    def requestheaders(self, f: http.HTTPFlow) -> None:
        self.calls.append(f"requestheaders {self.name}")

    async def response(self, f: http.HTTPFlow) -> None:
        self.calls.append(f"response {self.name}")


class Parent(Recorder):
    def __init__(self) -> None:
        super().__init__("parent")
        self.addons = [Recorder("child")]


class Updates:
    def __init__(self) -> None:
        self.updated: list[object] = []

    def update(self, flows: list[object]) -> None:
        self.updated.extend(flows)


class Broken:
    def requestheaders(self, f: http.HTTPFlow) -> None:
        raise ValueError("boom")


class TestLeanAddons:
    def test_is_mitmproxys_addon_manager_with_the_hook_it_overrides(self):
        assert issubclass(LeanAddons, AddonManager)
        for name in ("handle_lifecycle", "register", "add", "remove", "clear", "chain"):
            assert hasattr(AddonManager, name) or name == "chain", f"mitmproxy's AddonManager lost {name}"

    def test_calls_handlers_in_chain_order_children_after_parents_sync_and_async(self):
        first, parent = Recorder("first"), Parent()
        manager, f = lean_manager(first, parent), tflow.tflow()
        complete(manager.handle_lifecycle(HttpRequestHeadersHook(f)))
        complete(manager.handle_lifecycle(HttpResponseHook(f)))
        child = parent.addons[0]
        assert first.calls == ["requestheaders first", "response first"]
        assert parent.calls == ["requestheaders parent", "response parent"]
        assert child.calls == ["requestheaders child", "response child"]

    def test_update_hook_only_when_someone_listens(self):
        f = tflow.tflow()
        quiet = lean_manager(Recorder())
        complete(quiet.handle_lifecycle(HttpRequestHeadersHook(f)))
        assert quiet.handlers(hooks.UpdateHook.name) == ()
        updates = Updates()
        listening = lean_manager(Recorder(), updates)
        complete(listening.handle_lifecycle(HttpRequestHeadersHook(f)))
        assert updates.updated == [f]

    def test_index_follows_added_and_removed_addons(self):
        manager, f = lean_manager(Recorder("a")), tflow.tflow()
        complete(manager.handle_lifecycle(HttpRequestHeadersHook(f)))
        late = Recorder("late")
        manager.add(late)
        complete(manager.handle_lifecycle(HttpRequestHeadersHook(f)))
        assert late.calls == ["requestheaders late"]
        manager.remove(late)
        complete(manager.handle_lifecycle(HttpRequestHeadersHook(f)))
        assert late.calls == ["requestheaders late"]

    def test_an_addon_error_is_logged_and_the_chain_goes_on(self, caplog):
        after = Recorder("after")
        manager = lean_manager(Broken(), after)
        with caplog.at_level(logging.ERROR, logger="meshlet.proxy"):
            complete(manager.handle_lifecycle(HttpRequestHeadersHook(tflow.tflow())))
        assert "Addon error: boom" in caplog.text
        assert after.calls == ["requestheaders after"]

    def test_routing_addon_works_through_it(self):
        addon = beta_routing()
        manager, f = lean_manager(H2c(), addon), flow(x_group="beta")
        complete(manager.handle_lifecycle(HttpRequestHeadersHook(f)))
        assert (f.request.host, f.request.port) == ("127.0.0.1", 9082)

