"""The pure core of `--watch-kube`: resource events in, table swaps and status conditions out."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from meshlet.k8s.manifest import Yaml12Loader
from meshlet.k8s.reconcile import Reconciler, policy_text

REPO = Path(__file__).parents[3]
NOW = "2026-01-01T00:00:00Z"


def resource(generation: int = 1, weights: tuple[int, int] = (90, 10), name: str = "reviews") -> dict:
    doc = yaml.load((REPO / "policies" / "canary.yaml").read_text(), Loader=Yaml12Loader)
    doc["metadata"].update(name=name, namespace="shop", generation=generation, uid="u-1", resourceVersion="7",
                           managedFields=[{"manager": "meshlet"}], creationTimestamp=NOW)
    doc["spec"]["routes"][0]["to"] = [{"backend": "v1", "weight": weights[0]}, {"backend": "v2", "weight": weights[1]}]
    doc["status"] = {"conditions": []}
    return doc


def weights(step) -> list[int]:
    return [t.weight for t in step.policies.traffic[0].routes[0].to]


def test_server_fields_are_dropped_before_loading():
    doc = resource()
    doc["spec"]["routes"][0]["retries"] = {"attempts": 2, "on": ["5xx"]}  # the deprecated name
    text = policy_text(doc)
    for field in ("uid", "resourceVersion", "managedFields", "status", "generation"):
        assert field not in text
    assert '"on": [' in text  # JSON: the `on` key cannot become a boolean


def test_a_deprecated_field_applies_and_its_warning_is_in_the_condition():
    doc = resource()
    doc["spec"]["routes"][0]["retries"] = {"attempts": 2, "on": ["5xx"]}
    step = Reconciler().event("ADDED", doc, NOW)
    assert step.policies.traffic[0].routes[0].retries.on == ("5xx",)
    assert step.condition.ready
    assert step.condition.message.startswith("in use; trafficpolicy/shop/reviews:")
    assert "warning: TrafficPolicy 'reviews' spec.routes[0].retries: 'on' is deprecated, write 'retryOn'" in (
        step.condition.message)


def test_good_update_swaps_and_reports_ready():
    r = Reconciler()
    step = r.event("ADDED", resource(), NOW)
    assert weights(step) == [90, 10]
    assert step.condition.ready and step.condition.generation == 1
    assert step.condition.status_patch()["status"]["conditions"][0] == {
        "type": "Ready", "status": "True", "reason": "Applied", "message": "in use", "observedGeneration": 1,
        "lastTransitionTime": NOW,
    }
    assert weights(r.event("MODIFIED", resource(2, (80, 20)), NOW)) == [80, 20]


def test_bad_update_keeps_the_previous_version_and_says_where():
    r = Reconciler()
    r.event("ADDED", resource(), NOW)
    step = r.event("MODIFIED", resource(2, (80, 30)), NOW)
    assert step.policies is None
    assert not step.condition.ready and step.condition.reason == "Invalid"
    assert step.condition.message.startswith("trafficpolicy/shop/reviews:")
    assert "weights sum to 110, must be 100" in step.condition.message
    assert "refused, keeping the previous version" in step.log
    assert [t.weight for t in r.policies().traffic[0].routes[0].to] == [90, 10]


def test_bad_first_version_is_not_applied():
    r = Reconciler()
    bad = resource()
    bad["spec"]["backends"]["v1"]["address"] = "nowhere"
    step = r.event("ADDED", bad, NOW)
    assert step.policies is None and "not applied" in step.log
    assert r.policies().traffic == ()


def test_unchanged_spec_does_not_swap():
    r = Reconciler()
    r.event("ADDED", resource(), NOW)
    step = r.event("MODIFIED", copy.deepcopy(resource()), NOW)  # e.g. only our status changed
    assert step.policies is None and step.condition.ready


def test_delete_and_resync():
    r = Reconciler()
    r.event("ADDED", resource(name="a"), NOW)
    r.event("ADDED", resource(name="b") | {"spec": {**resource()["spec"], "host": "ratings"}}, NOW)
    assert [p.metadata.name for p in r.event("DELETED", resource(name="a"), NOW).policies.traffic] == ["b"]
    assert r.event("DELETED", resource(name="zzz"), NOW).policies is None
    steps = r.resync([], NOW)
    assert [s.log for s in steps] == ["trafficpolicy/shop/b: deleted"]
    assert r.policies().traffic == ()


def test_source_is_the_good_set_as_one_policy_text():
    from meshlet.policy import load_text

    r = Reconciler()
    r.event("ADDED", resource(name="a"), NOW)
    r.event("ADDED", resource(name="b") | {"spec": {**resource()["spec"], "host": "ratings"}}, NOW)
    r.event("MODIFIED", resource(name="a", weights=(1, 2)), NOW)  # refused: not in the source
    assert load_text(r.source()) == r.policies()
    r.resync([], NOW)
    assert r.source() == ""
