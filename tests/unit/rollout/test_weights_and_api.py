"""The rollout overlay on a routing table, the admin API's request parsing and the CLI's status
lines: pure pieces of the sidecar wiring, checked without a process."""

from __future__ import annotations

import pytest

from meshlet.commands.rollout import describe
from meshlet.policy import load_text
from meshlet.proxy.state import compile_policy, reweigh
from meshlet.rollout.api import BadCall, RolloutCall, parse_call
from meshlet.rollout.controller import RolloutController
from meshlet.rollout.service import status_json
from meshlet.rollout.weights import apply_weights, check_weights, rollout_weights

POLICY = """\
apiVersion: meshlet.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: reviews}
spec:
  host: reviews
  backends:
    v1: {address: "127.0.0.1:9081"}
    v2: {address: "127.0.0.1:9082"}
    v3: {address: "127.0.0.1:9083"}
  routes:
    - name: beta
      match: {headers: {x-group: beta}}
      to: [{backend: v3}]
    - name: canary
      to: [{backend: v1, weight: 80}, {backend: v2, weight: 0}, {backend: v3, weight: 20}]
      rollout: {canary: v2, stable: v1, steps: [25, 100], interval: 1s}
"""


def weights_of(policies, route_name):
    route = next(r for r in policies[0].routes if r.name == route_name)
    return {t.backend: t.weight for t in route.to}


def test_overlay_splits_only_the_canary_and_stable_share():
    policies = load_text(POLICY).traffic
    spec = policies[0].routes[1].rollout
    overlay = rollout_weights(policies, {("reviews", "canary"): (spec, 25)})
    assert overlay == {"reviews": {"canary": {"v1": 60, "v2": 20, "v3": 20}}}
    weighted = apply_weights(policies, overlay)
    assert weights_of(weighted, "canary") == {"v1": 60, "v2": 20, "v3": 20}
    assert weighted[0].routes[0] == policies[0].routes[0]  # other routes untouched
    assert apply_weights(policies, {}) == policies


def test_reweigh_keeps_the_source_and_compiles_a_new_generation():
    applied = compile_policy(POLICY, 1)
    overlay = {"reviews": {"canary": {"v1": 0, "v2": 80, "v3": 20}}}
    again = reweigh(applied, overlay, 2)
    assert (again.source, again.policies, again.table.generation) == (applied.source, applied.policies, 2)
    assert weights_of(again.table.policies, "canary") == {"v1": 0, "v2": 80, "v3": 20}
    assert weights_of(applied.table.policies, "canary") == {"v1": 80, "v2": 0, "v3": 20}  # the old one unchanged
    assert compile_policy(POLICY, 3, weights=overlay).table.policies == again.table.policies


@pytest.mark.parametrize("bad", [[], {"p": []}, {"p": {"r": {"b": -1}}}, {"p": {"r": {"b": "10"}}}])
def test_overlay_from_the_wire_is_checked(bad):
    with pytest.raises(ValueError, match="bad rollout weights"):
        check_weights(bad)


@pytest.mark.parametrize(("method", "target", "call"), [
    ("GET", "/rollouts", RolloutCall(None, None)),
    ("GET", "/rollouts/", RolloutCall(None, None)),
    ("GET", "/rollouts/reviews", RolloutCall("reviews", None)),
    ("POST", "/rollouts/reviews/start", RolloutCall("reviews", "start")),
    ("POST", "/rollouts/reviews/abort?route=canary", RolloutCall("reviews", "abort", "canary")),
])
def test_parse_call(method, target, call):
    assert parse_call(method, target) == call


@pytest.mark.parametrize(("method", "target", "status"), [
    ("POST", "/rollouts/reviews", 405),
    ("GET", "/rollouts/reviews/start", 405),
    ("POST", "/rollouts/reviews/rewind", 400),
    ("POST", "/rollouts/a/b/c", 404),
])
def test_parse_call_errors(method, target, status):
    with pytest.raises(BadCall) as caught:
        parse_call(method, target)
    assert caught.value.status == status and "\n" not in str(caught.value)


def test_status_lines_show_step_weight_analysis_and_history():
    policies = load_text(POLICY).traffic
    controller = RolloutController(clock=lambda: 0.0)
    controller.start(policies, "reviews")
    lines = describe(status_json(*controller.describe("reviews")[0]))
    assert lines[0] == ("reviews/canary: Progressing, step 1/2 (25% 100%), canary v2 at 25% (stable v1), "
                        "failed analyses 0/2, interval 1s")
    assert lines[1] == "  last analysis: none yet"
    assert lines[3].endswith("Progressing  25%  started: canary v2 at step 1 (25%)")


def test_restart_does_not_resume_a_rollout_whose_spec_changed(tmp_path):
    store = tmp_path / "rollouts.json"
    RolloutController(store, clock=lambda: 0.0).start(load_text(POLICY).traffic, "reviews")
    same = RolloutController(store, clock=lambda: 5.0)
    assert [s.weight for s in same.resume_saved(load_text(POLICY).traffic)] == [25]
    changed = load_text(POLICY.replace("steps: [25, 100]", "steps: [10, 50, 100]")).traffic
    assert RolloutController(store, clock=lambda: 5.0).resume_saved(changed) == []
    swapped = load_text(POLICY.replace("canary: v2, stable: v1", "canary: v3, stable: v1")).traffic
    assert RolloutController(store, clock=lambda: 5.0).resume_saved(swapped) == []
