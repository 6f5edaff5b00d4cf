"""Rollouts end to end: real `meshlet run` (one process and `--workers 2`), real demo backends,
real traffic through the outbound listener, the `meshlet rollout` CLI and the admin API.

Intervals are 1s so a rollout walks its steps in seconds; load loops are bounded in time and
every wait has a deadline. Nothing here asserts speed.
"""

from __future__ import annotations

import subprocess
import time
from collections import Counter

import pytest
from rollout_support import (
    MESHLET,
    PLAIN_ROUTE,
    admin,
    backends,
    cli,
    get,
    metric,
    reviews,
    rollout_route,
    run_sidecar,
    served_by,
    status,
    traffic,
    wait_for,
)

pytestmark = pytest.mark.timeout(120)
__all__ = ["backends"]  # the module-scoped fixture


def test_healthy_canary_walks_every_step_and_succeeds(backends):
    with run_sidecar(reviews(backends, rollout_route())) as sidecar:
        assert served_by(sidecar, 20) == Counter({"v1": 20})  # no rollout yet: the policy's own split
        started = cli(sidecar, "start")
        assert started.returncode == 0, started.stderr
        assert "Progressing, step 1/5" in started.stdout and "canary v2 at 5%" in started.stdout
        with traffic(sidecar):
            final = wait_for(sidecar, lambda s: s["phase"] != "Progressing", "the rollout to finish")
        assert (final["phase"], final["weight"], final["step"]) == ("Succeeded", 100, 5)
        assert [h["weight"] for h in final["history"]] == [5, 10, 25, 50, 100, 100]
        assert final["last"]["verdict"] == "pass" and final["last"]["requests"] >= 5
        assert served_by(sidecar, 20) == Counter({"v2": 20})  # the table carries the promoted weight
        shown = cli(sidecar, "status")
        assert shown.returncode == 0, shown.stderr
        assert "Succeeded" in shown.stdout and "last analysis: pass" in shown.stdout
        assert "step 5: canary at 100%" in shown.stdout
        assert metric(sidecar, "meshlet_rollout_weight", policy="reviews", route="canary") == 100
        assert metric(sidecar, "meshlet_rollout_phase", route="canary", phase="Succeeded") == 1
        assert metric(sidecar, "meshlet_rollout_phase", route="canary", phase="Progressing") == 0
        assert "rollout reviews/canary: Succeeded weight=100" in sidecar.stderr()  # every transition logged


def test_failing_canary_is_rolled_back_and_gets_no_more_traffic(backends):
    route = rollout_route(steps="[20, 50, 100]")
    with run_sidecar(reviews(backends, route, canary="bad")) as sidecar:
        assert cli(sidecar, "start").returncode == 0
        with traffic(sidecar):
            final = wait_for(sidecar, lambda s: s["phase"] != "Progressing", "the rollback")
        assert (final["phase"], final["weight"]) == ("RolledBack", 0)
        assert final["failures"] == 2
        assert "rolled back after 2 failed analyses: success rate" in final["history"][-1]["reason"]
        assert served_by(sidecar, 50) == Counter({"v1": 50})
        assert metric(sidecar, "meshlet_rollout_weight", route="canary") == 0


def test_slow_canary_is_rolled_back_on_p99(backends):
    route = rollout_route(steps="[50, 100]", analysis="p99: {max: 20ms}", min_requests=3)
    with run_sidecar(reviews(backends, route)) as sidecar:
        assert cli(sidecar, "start").returncode == 0
        with traffic(sidecar, path="/sleep/0.05"):  # both backends answer after 50ms: above the bound
            final = wait_for(sidecar, lambda s: s["phase"] != "Progressing", "the rollback")
        assert final["phase"] == "RolledBack"
        assert "p99" in final["history"][-1]["reason"] and "above 20ms" in final["history"][-1]["reason"]


def test_low_traffic_holds_and_operator_commands_through_the_cli(backends):
    with run_sidecar(reviews(backends, rollout_route(min_requests=1000))) as sidecar:
        assert cli(sidecar, "start").returncode == 0
        with traffic(sidecar):
            held = wait_for(sidecar, lambda s: s["last"] is not None, "an analysis")
        assert held["last"]["verdict"] == "hold" and "fewer than min_requests 1000" in held["last"]["reasons"][0]
        assert (held["phase"], held["step"], held["weight"]) == ("Progressing", 1, 5)

        paused = cli(sidecar, "pause")
        assert paused.returncode == 0 and "Paused" in paused.stdout
        again = cli(sidecar, "pause")
        assert again.returncode == 1 and again.stderr.strip() == "meshlet: rollout of route 'canary' is already paused"
        assert cli(sidecar, "resume").returncode == 0
        assert status(sidecar)["phase"] == "Progressing"
        aborted = cli(sidecar, "abort")
        assert aborted.returncode == 0 and "Aborted" in aborted.stdout
        assert status(sidecar)["weight"] == 0
        assert served_by(sidecar, 20) == Counter({"v1": 20})
        late = cli(sidecar, "promote")
        assert late.returncode == 1 and "is Aborted; nothing to promote" in late.stderr
        assert cli(sidecar, "start").returncode == 0
        promoted = cli(sidecar, "promote")
        assert promoted.returncode == 0 and "Succeeded" in promoted.stdout
        assert served_by(sidecar, 20) == Counter({"v2": 20})


def test_admin_api_errors_are_one_line(backends):
    with run_sidecar(reviews(backends, rollout_route())) as sidecar:
        assert admin(sidecar, "GET", "/rollouts") == (200, {"rollouts": []})
        code, body = admin(sidecar, "GET", "/rollouts/reviews")
        assert code == 404 and body == {"errors": ["no rollout of 'reviews'"]}
        code, body = admin(sidecar, "POST", "/rollouts/nope/start")
        assert code == 404 and body == {"errors": ["no policy named 'nope' is loaded"]}
        code, body = admin(sidecar, "POST", "/rollouts/reviews/start?route=other")
        assert code == 404 and "route 'other' of policy 'reviews' declares no rollout section" in body["errors"][0]
        code, body = admin(sidecar, "POST", "/rollouts/reviews/jump")
        assert code == 400 and "unknown rollout action 'jump'" in body["errors"][0]
        assert admin(sidecar, "POST", "/rollouts/reviews/start")[0] == 200
        code, body = admin(sidecar, "POST", "/rollouts/reviews/start")
        assert code == 409 and body == {"errors": ["a rollout of 'reviews' is already Progressing"]}
        down = subprocess.run([MESHLET, "rollout", "status", "reviews", "--sidecar", "http://127.0.0.1:9"],
                              capture_output=True, text=True, timeout=30)
        assert down.returncode == 1 and down.stderr.startswith("meshlet: sidecar unreachable") and "Traceback" not in down.stderr


def test_policy_put_keeps_the_rollout_or_cancels_it_explicitly(backends, tmp_path):
    text = reviews(backends, rollout_route(steps="[30, 60, 100]", min_requests=1000))
    with run_sidecar(text) as sidecar:
        assert cli(sidecar, "promote").returncode == 1  # nothing started yet
        assert cli(sidecar, "start").returncode == 0
        code, body = admin(sidecar, "PUT", "/policy", text.encode())
        assert code == 200 and body["rollouts"] == ["rollout of reviews/canary kept at 30%"]
        kept = status(sidecar)
        assert (kept["phase"], kept["weight"], kept["step"]) == ("Progressing", 30, 1)
        assert set(served_by(sidecar, 60)) == {"v1", "v2"}  # still split, not reset to the policy's 100/0

        plain = tmp_path / "plain.yaml"
        plain.write_text(reviews(backends, PLAIN_ROUTE))
        applied = subprocess.run([MESHLET, "apply", str(plain), "--sidecar", sidecar.admin_url],
                                 capture_output=True, text=True, timeout=30)
        assert applied.returncode == 0, applied.stderr
        assert "rollout of reviews/canary cancelled: the applied policy changed or removed its rollout" in applied.stdout
        assert admin(sidecar, "GET", "/rollouts")[1] == {"rollouts": []}
        assert served_by(sidecar, 20) == Counter({"v1": 20})
        assert "cancelled" in sidecar.stderr()


def test_restart_with_state_dir_resumes_at_the_recorded_step(backends, tmp_path):
    text = reviews(backends, rollout_route(steps="[10, 40, 100]", interval="1s"))
    with run_sidecar(text, "--state-dir", str(tmp_path)) as sidecar:
        assert cli(sidecar, "start").returncode == 0
        with traffic(sidecar):
            wait_for(sidecar, lambda s: s["step"] >= 2, "step 2")
        assert cli(sidecar, "pause").returncode == 0  # hold it there across the restart
        recorded = status(sidecar)
        sidecar.process.kill()  # no graceful shutdown: the state file alone carries the rollout
        sidecar.process.wait(10)
    assert (tmp_path / "rollouts.json").exists()
    with run_sidecar(text, "--state-dir", str(tmp_path)) as sidecar:
        resumed = status(sidecar)
        assert (resumed["phase"], resumed["step"], resumed["weight"]) == ("Paused", recorded["step"], 40)
        assert resumed["history"] == recorded["history"]
        assert set(served_by(sidecar, 60)) == {"v1", "v2"}  # the recorded weight is in the first table
        assert cli(sidecar, "resume").returncode == 0
        with traffic(sidecar):
            final = wait_for(sidecar, lambda s: s["phase"] != "Progressing", "the resumed rollout to finish")
        assert (final["phase"], final["weight"]) == ("Succeeded", 100)


def test_two_workers_analysis_counts_requests_of_both(backends):
    text = reviews(backends, rollout_route(steps="[50, 100]", interval="5s", min_requests=1))
    with run_sidecar(text, workers=2) as sidecar:
        assert cli(sidecar, "start").returncode == 0
        first_due = status(sidecar)["next_analysis"]
        baseline = wait_for(sidecar, lambda s: s["next_analysis"] != first_due, "the baseline")
        assert baseline["last"] is None
        # A fresh connection per request: SO_REUSEPORT spreads them over both workers.
        canary = sum(get(sidecar.outbound).backend == "v2" for _ in range(80))
        assert time.time() < baseline["next_analysis"], "the load did not fit in one interval (machine too busy)"
        analysed = wait_for(sidecar, lambda s: s["last"] is not None, "the first analysis")
        assert analysed["last"]["requests"] == canary > 0
        assert analysed["weight"] == 100
        assert served_by(sidecar, 20) == Counter({"v2": 20})  # both workers got the new weights
