"""Leader election's pure core (`meshlet.k8s.lease.decide`) and the rollout's record on the
TrafficPolicy status (`meshlet.rollout.kube`): no API server, Leases and resources as dicts
shaped like the API server's JSON, the clock a number."""

from __future__ import annotations

import json

import pytest

from meshlet.k8s.lease import decide, expired, micro_time, parse_time
from meshlet.policy import load_text
from meshlet.policy.model import Rollout
from meshlet.rollout import kube
from meshlet.rollout.analysis import AnalysisResult, Observation
from meshlet.rollout.controller import RolloutController
from meshlet.rollout.machine import Command, Tick, advance, start

NOW = 1_800_000_000.0


def lease(holder: str | None, renewed: float, duration: int = 15, transitions: int = 0, version: str = "7") -> dict:
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "meshlet-rollouts", "namespace": "shop", "resourceVersion": version},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": duration, "acquireTime": micro_time(renewed),
                     "renewTime": micro_time(renewed), "leaseTransitions": transitions}}


class TestDecide:
    def test_creates_a_missing_lease_and_leads(self):
        d = decide(None, "pod-a", NOW, 15, "meshlet-rollouts", "shop")
        assert (d.action, d.holder, d.leader) == ("create", "pod-a", True)
        assert d.body["metadata"] == {"name": "meshlet-rollouts", "namespace": "shop"}
        assert d.body["spec"]["holderIdentity"] == "pod-a"
        assert d.body["spec"]["leaseDurationSeconds"] == 15
        assert parse_time(d.body["spec"]["renewTime"]) == pytest.approx(NOW)

    def test_renews_its_own_lease_keeping_the_version_read(self):
        d = decide(lease("pod-a", NOW - 10, transitions=3), "pod-a", NOW, 15)
        assert (d.action, d.leader) == ("renew", True)
        assert d.body["metadata"]["resourceVersion"] == "7"  # the write is conditional on what was read
        assert parse_time(d.body["spec"]["renewTime"]) == pytest.approx(NOW)
        assert d.body["spec"]["leaseTransitions"] == 3
        assert parse_time(d.body["spec"]["acquireTime"]) == pytest.approx(NOW - 10)

    def test_follows_a_fresh_lease_held_by_another(self):
        d = decide(lease("pod-a", NOW - 14.5), "pod-b", NOW, 15)
        assert (d.action, d.holder, d.leader, d.body) == ("follow", "pod-a", False, None)

    def test_takes_over_after_expiry(self):
        d = decide(lease("pod-a", NOW - 15, transitions=2), "pod-b", NOW, 15)
        assert (d.action, d.holder, d.leader) == ("acquire", "pod-b", True)
        spec = d.body["spec"]
        assert spec["holderIdentity"] == "pod-b"
        assert spec["leaseTransitions"] == 3
        assert parse_time(spec["acquireTime"]) == pytest.approx(NOW)
        assert d.body["metadata"]["resourceVersion"] == "7"

    def test_expiry_uses_the_duration_written_by_the_holder(self):
        assert decide(lease("pod-a", NOW - 20, duration=30), "pod-b", NOW, 15).action == "follow"
        assert decide(lease("pod-a", NOW - 31, duration=30), "pod-b", NOW, 15).action == "acquire"

    @pytest.mark.parametrize("holder", [None, ""])
    def test_acquires_a_released_lease_at_once(self, holder):
        d = decide(lease(holder, NOW - 1), "pod-b", NOW, 15)
        assert (d.action, d.holder) == ("acquire", "pod-b")

    def test_unreadable_renew_time_counts_as_expired(self):
        broken = lease("pod-a", NOW)
        broken["spec"]["renewTime"] = broken["spec"]["acquireTime"] = "yesterday"
        assert expired(broken, NOW)
        assert decide(broken, "pod-b", NOW, 15).action == "acquire"

    def test_racing_replicas_write_against_the_same_version(self):
        """Both see the expired Lease at version 7; the API server accepts one write and answers
        409 to the other (tested against the fake API server in tests/integration/rollout)."""
        old = lease("pod-a", NOW - 60)
        b, c = decide(old, "pod-b", NOW, 15), decide(old, "pod-c", NOW, 15)
        assert b.leader and c.leader
        assert b.body["metadata"]["resourceVersion"] == c.body["metadata"]["resourceVersion"] == "7"

    def test_micro_time_round_trips(self):
        assert micro_time(NOW + 0.25).endswith(".250000Z")
        assert parse_time(micro_time(NOW + 0.25)) == pytest.approx(NOW + 0.25)
        assert parse_time(None) is None


POLICY = """\
apiVersion: meshlet.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: reviews}
spec:
  host: reviews
  backends: {v1: {address: "127.0.0.1:9081"}, v2: {address: "127.0.0.1:9082"}}
  routes:
    - name: canary
      to: [{backend: v1, weight: 100}, {backend: v2, weight: 0}]
      rollout: {canary: v2, stable: v1, steps: [10, 50, 100], interval: 30s, failure_limit: 2}
"""
SPEC = Rollout(canary="v2", stable="v1", steps=(10, 50, 100), interval=30.0, failure_limit=2)
PASS = AnalysisResult("pass", Observation(100, 0, 0.01), ())


def progressed():
    state = start(SPEC, "canary", 1000.0)
    return advance(SPEC, state, Tick(1030.0, PASS))  # step 2, 50%


class TestStatus:
    def test_condition_and_record_follow_each_transition(self):
        state = progressed()
        status = kube.with_rollout({"conditions": [{"type": "Ready", "status": "True", "reason": "Valid"}]},
                                   SPEC, state, "2026-01-01T00:00:00Z", generation=4)
        ready, rollout = status["conditions"]
        assert ready["type"] == "Ready"  # the watch's condition is carried over
        assert (rollout["type"], rollout["status"], rollout["reason"]) == ("Rollout", "True", "Progressing")
        assert rollout["observedGeneration"] == 4
        assert "50% (step 2)" in rollout["message"]
        saved = status["rollouts"]["canary"]
        assert (saved["phase"], saved["step"], saved["weight"]) == ("Progressing", 1, 50)
        assert (saved["canary"], saved["stable"], saved["steps"]) == ("v2", "v1", [10, 50, 100])

        rolled = advance(SPEC, state, Command(1040.0, "abort", "by operator"))
        status = kube.with_rollout(status, SPEC, rolled, "2026-01-01T00:01:00Z")
        rollout = status["conditions"][-1]
        assert (rollout["status"], rollout["reason"]) == ("False", "Aborted")
        assert rollout["lastTransitionTime"] == "2026-01-01T00:01:00Z"
        assert [c["type"] for c in status["conditions"]] == ["Ready", "Rollout"]
        assert status["rollouts"]["canary"]["weight"] == 0

    def test_transition_time_stays_while_phase_is_unchanged(self):
        first = start(SPEC, "canary", 1000.0)
        status = kube.with_rollout(None, SPEC, first, "T1")
        status = kube.with_rollout(status, SPEC, progressed(), "T2")
        assert status["conditions"][-1]["lastTransitionTime"] == "T1"

    def test_recorded_state_resumes_a_new_controller(self, tmp_path):
        """What the leader records is what a restarted replica, or its successor, resumes from."""
        state = progressed()
        obj = {"metadata": {"name": "reviews"},
               "status": kube.with_rollout(None, SPEC, state, "T")}
        saved = kube.recorded([obj, {"metadata": {"name": "other"}}])
        assert list(saved) == ["reviews"]
        assert kube.state_of(saved["reviews"]) == state

        policies = load_text(POLICY).traffic
        (tmp_path / "rollouts.json").write_text(json.dumps(saved))
        controller = RolloutController(tmp_path / "rollouts.json", clock=lambda: 2000.0)
        [resumed] = controller.resume_saved(policies)
        assert (resumed.phase, resumed.step, resumed.weight) == ("Progressing", 1, 50)

    def test_active_route_wins_over_a_finished_one(self):
        done = advance(SPEC, start(SPEC, "old", 900.0), Command(950.0, "abort"))
        status = kube.with_rollout(None, SPEC, done, "T")
        status = kube.with_rollout(status, SPEC, progressed(), "T")
        assert kube.recorded([{"metadata": {"name": "p"}, "status": status}])["p"]["route"] == "canary"

    def test_status_from_the_resource_reads_like_the_admin_api(self):
        """`meshlet rollout status --kube`: thresholds from the spec, state from the status."""
        import yaml

        from meshlet.rollout.machine import RolloutNotFound

        obj = yaml.safe_load(POLICY)
        obj["metadata"]["namespace"] = "shop"
        with pytest.raises(RolloutNotFound, match="trafficpolicy/shop/reviews records no rollout"):
            kube.status_from(obj)
        obj["status"] = kube.with_rollout(None, SPEC, progressed(), "T")
        shown = kube.status_from(obj)
        assert (shown["policy"], shown["route"], shown["phase"], shown["step"], shown["weight"]) == (
            "reviews", "canary", "Progressing", 2, 50)
        assert (shown["interval"], shown["failure_limit"], shown["steps"]) == (30.0, 2, [10, 50, 100])
        with pytest.raises(RolloutNotFound, match="on route 'other'"):
            kube.status_from(obj, "other")
