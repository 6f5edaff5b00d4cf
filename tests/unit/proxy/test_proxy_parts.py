"""The sidecar's pure parts: listen addresses, config hand-off, policy state, metrics, diff."""

from __future__ import annotations

import pytest

from meshlet.policy import PolicyInvalid, load_text
from meshlet.policy.diff import diff
from meshlet.policy.model import Address
from meshlet.proxy.config import SidecarConfig, config_from_json, config_to_json, parse_listen
from meshlet.proxy.state import PolicyState, compile_policy

BASE = """\
apiVersion: meshlet.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: reviews}
spec:
  host: reviews
  backends:
    v1: {address: "127.0.0.1:9081"}
    v2: {address: "127.0.0.1:9082"}
  routes:
    - name: canary
      to: [{backend: v1, weight: 90}, {backend: v2, weight: 10}]
"""


@pytest.mark.parametrize(("text", "address"), [
    ("127.0.0.1:15001", Address("127.0.0.1", 15001)), (":15006", Address("0.0.0.0", 15006)),
    ("[::1]:0", Address("::1", 0)), ("localhost:80", Address("localhost", 80)),
])
def test_parse_listen(text, address):
    assert parse_listen(text) == address


@pytest.mark.parametrize("text", ["15001", "host:", "h:99999", "h:x"])
def test_parse_listen_rejects(text):
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        parse_listen(text)


def test_modes_take_both_request_forms_outbound_and_reverse_inbound():
    assert SidecarConfig().mode_specs() == ["regular@127.0.0.1:15001", "reverse:http://127.0.0.1:8080@0.0.0.0:15006"]


def test_config_survives_the_hand_off_to_workers():
    config = SidecarConfig(outbound=Address("127.0.0.1", 1), strict_hosts=True, metrics_compat="istio")
    assert config_from_json(config_to_json(config)) == config


class TestPolicyState:
    def test_apply_swaps_and_counts_generations(self):
        state = PolicyState(compile_policy(BASE, 1))
        old = state.table
        applied = state.apply(BASE.replace("90", "50").replace("10}", "50}"))
        assert state.generation == 2 and state.table is applied.table and state.table is not old

    def test_invalid_policy_leaves_the_table(self):
        state = PolicyState(compile_policy(BASE, 1))
        table = state.table
        with pytest.raises(PolicyInvalid) as e:
            state.apply(BASE.replace("weight: 10", "weight: 5"), "put")
        assert str(e.value.errors[0]).startswith("put:")
        assert state.table is table and state.generation == 1

    def test_prepare_with_a_given_generation_does_not_swap(self):
        state = PolicyState(compile_policy(BASE, 1))
        prepared = state.prepare(BASE, generation=7)
        assert prepared.table.generation == 7 and state.generation == 1


class TestDiff:
    def old(self):
        return load_text(BASE)

    def test_same_policy_no_lines(self):
        assert diff(self.old(), self.old()) == []

    def test_weights_routes_and_backends(self):
        new = load_text(
            BASE.replace("90}", "80}").replace("weight: 10", "weight: 20")
            .replace('v2: {address: "127.0.0.1:9082"}', 'v2: {address: "127.0.0.1:9092"}\n    v3: {address: "127.0.0.1:9083"}')
            .replace("    - name: canary", "    - name: v3-users\n      match: {headers: {x-v3: yes}}\n      to: [{backend: v3}]\n    - name: canary")
        )
        assert diff(self.old(), new) == [
            "~ TrafficPolicy default/reviews:",
            "    ~ backend v2: 127.0.0.1:9082 → 127.0.0.1:9092",
            "    + backend v3 (127.0.0.1:9083)",
            "    ~ route canary: v1 90→80, v2 10→20",
            "    + route v3-users (v3 100)",
        ]

    def test_policies_added_and_removed(self):
        other = load_text(BASE.replace("name: reviews", "name: ratings").replace("host: reviews", "host: ratings"))
        assert diff(self.old(), other) == [
            "- TrafficPolicy default/reviews", "+ TrafficPolicy default/ratings (host ratings, 1 routes)",
        ]
