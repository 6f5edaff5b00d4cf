"""Host lookup, request matching and compile-time errors of the routing table."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from routing_support import split_policy, view

from meshlet.policy import load_file, load_text
from meshlet.policy.model import Route, WeightedBackend
from meshlet.routing import Decision, RoutingTable, Unmatched, compile_table, decide
from meshlet.routing.hosts import host_key

EXAMPLES = Path(__file__).resolve().parents[3] / "policies"

MATCHES = """
apiVersion: meshlet.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  backends:
    v1: {address: "127.0.0.1:9081"}
    v2: {address: "127.0.0.1:9082"}
  routes:
    - name: all-parts
      match: {headers: {x-a: "1"}, cookies: {c: "2"}, path: {prefix: /both}, method: [POST]}
      to: [{backend: v2}]
    - name: header-exact
      match: {headers: {x-group: beta}}
      to: [{backend: v2}]
    - name: header-regex
      match: {headers: {x-tier: {regex: "gold|silver"}}}
      to: [{backend: v2}]
    - name: header-prefix
      match: {headers: {user-agent: {prefix: "Mozilla/"}}}
      to: [{backend: v2}]
    - name: cookie
      match: {cookies: {ab: B}}
      to: [{backend: v2}]
    - name: path-exact
      match: {path: {exact: /health}}
      to: [{backend: v2}]
    - name: path-prefix
      match: {path: {prefix: /api/}}
      to: [{backend: v2}]
    - name: path-regex
      match: {path: {regex: "/items/[0-9]+"}}
      to: [{backend: v2}]
    - name: method
      match: {method: [DELETE, PATCH]}
      to: [{backend: v2}]
    - name: default
      to: [{backend: v1}]
"""

NO_DEFAULT = """
apiVersion: meshlet.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: beta-only, namespace: default}
spec:
  host: beta.example.com
  backends:
    v2: {address: "127.0.0.1:9082"}
  routes:
    - name: beta
      match: {headers: {x-group: beta}}
      to: [{backend: v2}]
"""


def _table(*texts: str, generation: int = 0) -> RoutingTable:
    policies = [policy for text in texts for policy in load_text(text, "test.yaml").traffic]
    return compile_table(policies, generation)


def _route(table: RoutingTable, request) -> str:
    result = decide(table, request)
    assert isinstance(result, Decision), result
    return result.route.name


class TestHosts:
    table = _table(MATCHES, NO_DEFAULT)

    @pytest.mark.parametrize("authority", [
        "reviews", "reviews:9080", "REVIEWS", "Reviews:80", "reviews.",
        "reviews.default", "reviews.default.svc", "reviews.default.svc.cluster.local",
        "reviews.default.svc.cluster.local.", "Reviews.Default.SVC.cluster.local:8080",
    ])
    def test_short_host_governs_its_kubernetes_names(self, authority):
        assert self.table.policy_for(authority).metadata.name == "reviews"
        assert _route(self.table, view(authority)) == "default"

    @pytest.mark.parametrize("authority", [
        "ratings", "reviews.other", "reviews.default.svc.cluster", "reviews.default.svc.example.org",
        "reviewsx", "xreviews.default", "beta.example.com.default", "beta", "",
    ])
    def test_unknown_hosts_pass_through(self, authority):
        assert self.table.policy_for(authority) is None
        assert decide(self.table, view(authority)) is None

    @pytest.mark.parametrize("authority", ["beta.example.com", "BETA.example.com:443", "beta.example.com."])
    def test_dotted_host_governs_only_itself(self, authority):
        assert self.table.policy_for(authority).metadata.name == "beta-only"

    def test_governed_host_without_matching_route_is_unmatched(self):
        result = decide(self.table, view("beta.example.com", headers={"x-group": "alpha"}))
        assert result == Unmatched(self.table.policy_for("beta.example.com"))
        assert _route(self.table, view("beta.example.com", headers={"x-group": "beta"})) == "beta"

    @pytest.mark.parametrize("authority, key", [
        ("[::1]:80", "::1"), ("[::1]", "::1"), ("::1", "::1"), ("[FE80::1]:8443", "fe80::1"),
        ("a:80", "a"), ("A.b.C", "a.b.c"), ("127.0.0.1:8080", "127.0.0.1"), ("[broken", "[broken"),
    ])
    def test_host_key_strips_port_and_case(self, authority, key):
        assert host_key(authority) == key

    def test_ip_host_gets_no_kubernetes_names(self):
        table = compile_table([split_policy({"v1": 100}, host="127.0.0.1")])
        assert table.policy_for("127.0.0.1:8080") is not None
        assert table.policy_for("127.0.0.1.default") is None

    def test_explicit_host_beats_derived_name_then_first_policy_wins(self):
        prod = load_text(MATCHES.replace("namespace: default", "namespace: prod")).traffic[0]
        other = load_text(MATCHES.replace("name: reviews", "name: other", 1)).traffic[0]
        explicit = split_policy({"v1": 100}, host="reviews.prod")
        table = compile_table([prod, other, explicit])
        assert table.policy_for("reviews") is prod  # both claim the short name: first loaded wins
        assert table.policy_for("reviews.default") is other
        assert table.policy_for("reviews.prod") is explicit  # written beats derived
        assert table.policy_for("reviews.prod.svc") is prod


class TestMatches:
    table = _table(MATCHES)

    @pytest.mark.parametrize("request_, route", [
        (view(headers={"x-group": "beta"}), "header-exact"),
        (view(headers={"x-group": "beta2"}), "default"),
        (view(headers={"x-group": "Beta"}), "default"),
        (view(headers={"x-tier": "gold"}), "header-regex"),
        (view(headers={"x-tier": "silver"}), "header-regex"),
        (view(headers={"x-tier": "gold-plus"}), "default"),  # fullmatch, not search
        (view(headers={"x-tier": "rose gold"}), "default"),
        (view(headers={"user-agent": "Mozilla/5.0 (X11)"}), "header-prefix"),
        (view(headers={"user-agent": "curl/8.0 Mozilla/"}), "default"),
        (view(cookies={"ab": "B"}), "cookie"),
        (view(cookies={"ab": "A"}), "default"),
        (view(headers={"ab": "B"}), "default"),  # a header is not a cookie
        (view(path="/health"), "path-exact"),
        (view(path="/health?verbose=1"), "path-exact"),  # query ignored
        (view(path="/healthz"), "default"),
        (view(path="/api/v1/users?x=/items/1"), "path-prefix"),
        (view(path="/api"), "default"),
        (view(path="/items/42"), "path-regex"),
        (view(path="/items/42?page=2"), "path-regex"),
        (view(path="/items/42/reviews"), "default"),
        (view(path="/x?/items/42"), "default"),  # the query is not the path
        (view(method="DELETE"), "method"),
        (view(method="PATCH", path="/anything"), "method"),
        (view(method="POST"), "default"),
    ])
    def test_each_match_kind(self, request_, route):
        assert _route(self.table, request_) == route

    def test_first_match_wins(self):
        both = view(headers={"x-group": "beta", "x-tier": "gold"}, cookies={"ab": "B"}, path="/health")
        assert _route(self.table, both) == "header-exact"
        assert _route(self.table, view(cookies={"ab": "B"}, path="/health", method="DELETE")) == "cookie"

    def test_all_parts_must_hold(self):
        full = {"method": "POST", "path": "/both/x?q=1", "headers": {"x-a": "1"}, "cookies": {"c": "2"}}
        assert _route(self.table, view(**full)) == "all-parts"
        for broken in ({"method": "GET"}, {"path": "/other"}, {"headers": {"x-a": "2"}}, {"headers": {}},
                       {"cookies": {"c": "3"}}, {"cookies": {}}):
            assert _route(self.table, view(**{**full, **broken})) == "default", broken

    def test_decision_carries_the_model_objects(self):
        policy = self.table.policies[0]
        result = decide(self.table, view(headers={"x-group": "beta"}))
        assert result == Decision(policy, policy.routes[1], policy.backend("v2"))
        assert result.backend.address.port == 9082


class TestTable:
    def test_table_is_immutable_and_keeps_generation_and_order(self):
        first, second = split_policy({"v1": 100}, host="a"), split_policy({"v1": 100}, host="b")
        table = compile_table(iter([first, second]), generation=7)
        assert table.generation == 7
        assert table.policies == (first, second)
        with pytest.raises(dataclasses.FrozenInstanceError):
            table.generation = 8

    def test_decide_is_a_pure_function_of_table_and_request(self):
        table = compile_table([split_policy({"v1": 50, "v2": 50})])
        for entropy in (0, 2**63, 2**64 - 1, 12345678901234567):
            request = view(entropy=entropy)
            assert len({decide(table, request) for _ in range(5)}) == 1

    def test_unknown_backend_is_a_compile_error(self):
        policy = split_policy({"v1": 100})
        bad = dataclasses.replace(policy, routes=(Route("r", (WeightedBackend("v9", 100),)),))
        with pytest.raises(ValueError, match="route 'r': unknown backend 'v9'"):
            compile_table([bad])

    @pytest.mark.parametrize("weights", [{"v1": 0, "v2": 0}, {"v1": -10, "v2": 110}])
    def test_weights_without_a_positive_backend_are_a_compile_error(self, weights):
        with pytest.raises(ValueError, match="route 'split'"):
            compile_table([split_policy(weights)])

    @pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
    def test_example_policies_compile(self, path):
        traffic = load_file(path).traffic
        table = compile_table(traffic)
        for policy in traffic:  # each governs its host's cluster FQDN too
            assert table.policy_for(f"{policy.host}.{policy.metadata.namespace}.svc.cluster.local") is policy
