"""Rollouts across replicas with `--watch-kube`: one Lease holder drives, the resource status carries
the state, every replica serves the recorded weights, and a successor continues from the step.

No kube-apiserver (nor etcd) can run on this machine, so `fake_apiserver.FakeApiServer` plays
it, and only it: Leases with resourceVersion compare-and-swap and TrafficPolicies with status,
over real HTTP on loopback, reached with the official `kubernetes` client through a real
kubeconfig. The sidecars are real `meshlet run --watch-kube` processes routing real traffic to
real backends. Waits are bounded; nothing asserts speed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import yaml
from kubernetes import client

sys.path.insert(0, str(Path(__file__).parents[1] / "k8s"))
from fake_apiserver import FakeApiServer, kubeconfig
from rollout_support import MESHLET, admin, backends, reviews, rollout_route, run_sidecar, served_by, traffic

from meshlet.k8s.kube import connect
from meshlet.k8s.lease import LeaseElector, parse_time

pytestmark = pytest.mark.timeout(150)
__all__ = ["backends"]  # the module-scoped fixture

LEASE = 3  # seconds: a successor takes over at most this long (plus one period) after the holder dies
T = TypeVar("T")


def until(probe: Callable[[], T], what: str, timeout: float = 40.0) -> T:
    """Poll `probe` until it returns something truthy (bounded)."""
    pause = threading.Event()
    for _ in range(int(timeout / 0.1)):
        value = probe()
        if value:
            return value
        pause.wait(0.1)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def holder(server: FakeApiServer) -> str | None:
    lease = server.leases.get(("shop", "meshlet-rollouts"))
    return lease and lease["spec"].get("holderIdentity")


def rollout_status(server: FakeApiServer) -> tuple[dict, dict]:
    """The resource's Rollout condition and its recorded `status.rollouts.canary`."""
    status = (server.get("trafficpolicies", "shop", "reviews") or {}).get("status") or {}
    rollout = next((c for c in status.get("conditions", []) if c["type"] == "Rollout"), {})
    return rollout, (status.get("rollouts") or {}).get("canary", {})


def test_lease_elector_against_the_api_server(tmp_path):
    """The elector's I/O edge with the real client's CoordinationV1Api: create, follow, conflict, take over."""
    with FakeApiServer() as server:
        cluster = connect(kubeconfig=kubeconfig(tmp_path / "kubeconfig", {"test": server}, "test", "shop"))
        api = client.CoordinationV1Api(cluster.api.api_client)
        now = [1_800_000_000.0]
        a = LeaseElector(api, "shop", "rollouts", "pod-a", 15, clock=lambda: now[0])
        b = LeaseElector(api, "shop", "rollouts", "pod-b", 15, clock=lambda: now[0])

        assert a.step() and not b.step()
        assert (b.holder, holder_of(server)) == ("pod-a", "pod-a")
        now[0] += 10
        assert a.step() and not b.step(), "renewed: still fresh for b"
        renewed = parse_time(server.leases[("shop", "rollouts")]["spec"]["renewTime"])
        assert renewed == pytest.approx(now[0])

        stale = b._read()
        now[0] += 16  # a stopped renewing: its Lease expired
        assert a.step(), "a renews just before b writes"
        b._read = lambda: stale  # b decided on the version it read earlier, so the server refuses it
        assert not b.step(), "409 Conflict: b follows until next period"
        assert holder_of(server) == "pod-a"
        del b._read

        now[0] += 16
        assert b.step() and not a.step(), "expired: b takes over, a sees it and follows"
        spec = server.leases[("shop", "rollouts")]["spec"]
        assert (spec["holderIdentity"], spec["leaseTransitions"]) == ("pod-b", 1)

        b.release()
        assert server.leases[("shop", "rollouts")]["spec"].get("holderIdentity") is None  # PUT without it
        assert a.step(), "a released Lease is taken at once, without waiting for expiry"


def holder_of(server: FakeApiServer) -> str | None:
    return server.leases[("shop", "rollouts")]["spec"]["holderIdentity"]


def test_two_replicas_one_leader_same_weights_and_takeover_continues(tmp_path, backends):
    route = rollout_route(steps="[20, 40, 60, 80, 100]", interval="1s", min_requests=5)
    doc = yaml.safe_load(reviews(backends, route))
    doc["metadata"]["namespace"] = "shop"
    with FakeApiServer() as server:
        server.put(doc)
        env = {"KUBECONFIG": kubeconfig(tmp_path / "kubeconfig", {"test": server}, "test", namespace="shop")}
        args = ("--watch-kube", "--lease-duration", str(LEASE))
        with run_sidecar(None, *args, workers=1, env=env) as one, run_sidecar(None, *args, workers=1, env=env) as two:
            names = {f"{socket.gethostname()}-{s.process.pid}": s for s in (one, two)}
            leader = names[until(lambda: holder(server), "a Lease holder")]
            follower = two if leader is one else one
            for sidecar in (leader, follower):
                until(lambda s=sidecar: served_by(s, 3) == {"v1": 3}, "the watched policy to route")

            code, body = admin(follower, "POST", "/rollouts/reviews/start")
            assert code == 409 and "rollout leader" in body["errors"][0], body
            code, body = admin(leader, "POST", "/rollouts/reviews/start")
            assert code == 200, body

            with traffic(leader):
                until(lambda: admin(leader, "GET", "/rollouts/reviews")[1]["step"] >= 2, "the leader to step")
                code, paused = admin(leader, "POST", "/rollouts/reviews/pause")
            assert code == 200 and paused["phase"] == "Paused", paused
            step, weight = paused["step"], paused["weight"]

            condition, recorded = until(lambda: rollout_status(server)[0].get("reason") == "Paused"
                                        and rollout_status(server), "the Paused condition on the resource")
            assert condition["status"] == "True" and f"{weight}%" in condition["message"]
            assert (recorded["step"] + 1, recorded["weight"]) == (step, weight)

            def follower_matches() -> dict | None:
                code, body = admin(follower, "GET", "/rollouts/reviews")
                return body if code == 200 and (body["phase"], body["weight"]) == ("Paused", weight) else None

            until(follower_matches, "the follower to take the recorded state")
            split = served_by(follower, 60)
            assert set(split) == {"v1", "v2"}, f"the follower serves the leader's {weight}% split: {split}"
            assert admin(leader, "GET", "/metrics")[1].count("meshlet_rollout_weight") >= 1

            leader.process.kill()  # no release: the successor must wait for expiry
            leader.process.wait(10)
            successor = next(name for name, s in names.items() if s is follower)
            until(lambda: holder(server) == successor, "the follower to take the Lease", timeout=LEASE * 4 + 10)

            code, body = admin(follower, "GET", "/rollouts/reviews")
            assert code == 200 and (body["phase"], body["step"], body["weight"]) == ("Paused", step, weight), body
            code, body = admin(follower, "POST", "/rollouts/reviews/resume")
            assert code == 200, body
            with traffic(follower):
                after = until(lambda: (s := admin(follower, "GET", "/rollouts/reviews")[1])["step"] > step and s,
                              "the successor to continue past the recorded step")
            reasons = [h["reason"] for h in after["history"]]
            assert reasons[0].startswith("started") and any(r.startswith("paused") for r in reasons), reasons
            assert reasons.count(reasons[0]) == 1, "continued, not restarted"
            until(lambda: rollout_status(server)[1].get("step", 0) + 1 > step, "the successor to record its step")
            assert "Traceback" not in follower.stderr()

            shown = kube_cli(env, "status")
            assert shown.returncode == 0, shown.stderr
            assert shown.stdout.startswith("reviews/canary: ") and "paused" in shown.stdout, shown.stdout
            refused = kube_cli(env, "abort")
            assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
            assert "--kube reads status only" in refused.stderr and "Traceback" not in refused.stderr


def kube_cli(env: dict[str, str], action: str, policy: str = "reviews") -> subprocess.CompletedProcess[str]:
    return subprocess.run([MESHLET, "rollout", action, policy, "--kube"], capture_output=True, text=True,
                          timeout=30, env={**os.environ, **env})


def test_kube_status_without_a_recorded_rollout_is_one_line(tmp_path, backends):
    """`status --kube` of a resource no leader wrote to, and of a missing one: one line each, exit 1."""
    doc = yaml.safe_load(reviews(backends, rollout_route()))
    doc["metadata"]["namespace"] = "shop"
    with FakeApiServer() as server:
        server.put(doc)
        env = {"KUBECONFIG": kubeconfig(tmp_path / "kubeconfig", {"test": server}, "test", namespace="shop")}
        for policy, message in (("reviews", "records no rollout"), ("ratings", "404")):
            done = kube_cli(env, "status", policy)
            assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
            assert done.stderr.startswith("meshlet: ") and message in done.stderr, done.stderr
