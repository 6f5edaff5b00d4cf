"""`meshlet agent --kube` splits a `dataplane: kernel` TrafficPolicy it watches, in a Pod with
a real sidecar behind the injected iptables redirect, and the sidecar never sees those
connections (its request counter stays 0), while a host it does not split still goes through
the sidecar. Services are ClusterIPs in a network namespace behind the node (node_support).

The API server is `fake_apiserver.FakeApiServer` (nothing else is faked: no kube-apiserver can
run here). The sidecar reads the same policies from a file, with the backends' ClusterIPs
written out: it has no cluster DNS here and cannot reach the fake API server from the Pod.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from node_support import CGROUP_INET4_CONNECT, HTTP_BACKENDS, NEEDS, app, attached, cluster_node, http_get
from podnet_support import CFG, as_uid

from meshlet.k8s import sidecar

pytestmark = [*NEEDS, pytest.mark.timeout(180)]

SPLITS = "agent: kernel splits now"
SIDECAR_POLICY = """\
apiVersion: meshlet.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  backends: {v1: {address: "10.96.0.11:9080"}, v2: {address: "10.96.0.12:9080"}}
  routes: [{name: canary, to: [{backend: v1, weight: 50}, {backend: v2, weight: 50}]}]
---
apiVersion: meshlet.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: ratings, namespace: shop}
spec:
  host: ratings
  backends: {v1: {address: "10.96.0.13:9080"}}
  routes: [{name: all, to: [{backend: v1}], timeout: 2s}]
"""


def reviews(weights: tuple[int, int], dataplane: str = "kernel") -> dict:
    return {"apiVersion": "meshlet.dev/v1alpha1", "kind": "TrafficPolicy",
            "metadata": {"name": "reviews", "namespace": "shop"},
            "spec": {"host": "reviews", "dataplane": dataplane,
                     "backends": {"v1": {"address": "reviews-v1:9080"}, "v2": {"address": "reviews-v2:9080"}},
                     "routes": [{"name": "canary", "to": [{"backend": "v1", "weight": weights[0]},
                                                          {"backend": "v2", "weight": weights[1]}]}]}}


RATINGS = {"apiVersion": "meshlet.dev/v1alpha1", "kind": "TrafficPolicy",
           "metadata": {"name": "ratings", "namespace": "shop"},
           "spec": {"host": "ratings", "dataplane": "auto", "backends": {"v1": {"address": "ratings:9080"}},
                    "routes": [{"name": "all", "to": [{"backend": "v1"}], "timeout": "2s"}]}}


def start_sidecar(node, pod) -> None:
    """`meshlet run` as the sidecar's UID in the Pod (its namespace and cgroup), then the redirect."""
    home = node.shared_dir(CFG.uid)
    policy = home / "policy.yaml"
    policy.write_text(SIDECAR_POLICY)
    log = home / "sidecar.log"
    argv = pod.argv(*as_uid(CFG.uid), sys.executable, "-m", "meshlet.cli", "run", "--policy", str(policy),
                    "--workers", "1", "--outbound", f"127.0.0.1:{CFG.outbound_port}",
                    "--inbound", f"0.0.0.0:{CFG.inbound_port}", "--admin", f"127.0.0.1:{CFG.admin_port}")
    with open(log, "wb") as err:  # no -O re-exec: see test_k8s_redirect_sidecar
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err,
                                env={**os.environ, "HOME": str(home), "MESHLET_WORKER_DEBUG": "1"})
    node.processes.append(proc)
    deadline = time.monotonic() + 60
    while "ready outbound=" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    script = sidecar.redirect_script(CFG)
    result = subprocess.run(["ip", "netns", "exec", pod.netns, "/bin/sh", "-c", script], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def sidecar_requests(pod) -> float:
    """What the sidecar counted (`meshlet_requests_total`, every label)."""
    text = http_get(pod.netns, ("127.0.0.1", CFG.admin_port), "/metrics")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("meshlet_requests_total{"))


def test_a_watched_kernel_policy_splits_in_the_kernel_and_the_sidecar_never_sees_it(tmp_path):
    with cluster_node(tmp_path) as node:
        vip = node.service("reviews", 10)
        v1, v2, ratings = node.service("reviews-v1", 11), node.service("reviews-v2", 12), node.service("ratings", 13)
        node.start([sys.executable, "-c", HTTP_BACKENDS, f"vip,{vip},9080", f"v1,{v1},9080", f"v2,{v2},9080",
                    f"ratings,{ratings},9080"], node.services)
        pod = node.pod("frontend")
        start_sidecar(node, pod)
        node.publish(pod)
        node.api.put(reviews((50, 50)))
        node.api.put(RATINGS)
        agent = node.agent()
        agent.wait_for_log(f"{SPLITS} shop/reviews@{vip}:9080 v1=50/v2=50")
        assert "agent: hooks attached to pod shop/frontend" in agent.text()
        assert "agent: trafficpolicy/shop/ratings: stays in the proxy: timeout needs the proxy" in agent.text()

        split = app(pod, "reviews", vip, 40)
        assert set(split["names"]) == {"v1", "v2"} and sum(split["names"].values()) == 40
        assert split["peers"] == [f"{vip}:9080"], "getpeername shows the Service's address"
        assert sidecar_requests(pod) == 0, "no kernel-split connection reached the sidecar"
        assert app(pod, "ratings", ratings, 5)["names"] == {"ratings": 5}
        assert sidecar_requests(pod) == 5, "the redirect is live: a host the kernel does not split goes through it"
        found = agent.metrics()
        kernel = {dict(labels)["backend"]: value for (name, labels), value in found.items()
                  if name == "meshlet_kernel_connections_total"}
        assert kernel == {"v1": split["names"]["v1"], "v2": split["names"]["v2"]}
        assert found[("meshlet_agent_hooked_cgroups", ())] == 1

        node.api.put(reviews((100, 0)))  # live: new weights for new connections
        agent.wait_for_log(f"{SPLITS} shop/reviews@{vip}:9080 v1=100")
        assert app(pod, "reviews", vip, 10)["names"] == {"v1": 10}

        node.api.put(reviews((60, 50)))  # does not load: the running split stays
        agent.wait_for_log("agent: trafficpolicy/shop/reviews: refused, keeping the previous version: ")
        assert "weights sum to 110" in agent.text()
        errors = ("meshlet_agent_policy_errors_total", (("kind", "TrafficPolicy"), ("namespace", "shop"),
                                                         ("policy", "reviews")))
        assert agent.metrics()[errors] == 1
        assert app(pod, "reviews", vip, 10)["names"] == {"v1": 10}

        node.api.put(reviews((50, 50), dataplane="proxy"))  # back to the sidecar
        agent.wait_for_log(f"{SPLITS} none (hooks detached)")
        assert set(app(pod, "reviews", vip, 10)["names"]) <= {"v1", "v2"}
        assert sidecar_requests(pod) == 15
        assert attached(pod.cgroup, CGROUP_INET4_CONNECT) == ()

        node.api.put(reviews((0, 100)))
        agent.wait_for_log(f"{SPLITS} shop/reviews@{vip}:9080 v2=100")
        assert app(pod, "reviews", vip, 5)["names"] == {"v2": 5}
        assert agent.stop() == 0, agent.text()
        assert attached(pod.cgroup, CGROUP_INET4_CONNECT) == ()
        assert not (node.pin_base / "split").exists()
        assert "Traceback" not in agent.text()


def test_a_policy_only_governs_its_own_namespaces_clients(tmp_path):
    """The same Service address, two namespaces: only the policy's namespace is split."""
    with cluster_node(tmp_path) as node:
        vip = node.service("reviews", 10)
        v2 = node.service("reviews-v2", 12)
        node.start([sys.executable, "-c", HTTP_BACKENDS, f"vip,{vip},9080", f"v2,{v2},9080"], node.services)
        shop, books = node.pod("frontend"), node.pod("reader", namespace="books")
        for pod in (shop, books):
            node.publish(pod)
        policy = reviews((0, 100))
        policy["spec"]["backends"]["v1"]["address"] = "reviews-v2:9080"  # only v2 exists here
        node.api.put(policy)
        agent = node.agent()
        agent.wait_for_log(f"{SPLITS} shop/reviews@{vip}:9080 v2=100")
        agent.wait_for_log("agent: hooks attached to pod books/reader")
        assert app(shop, "reviews", vip, 5)["names"] == {"v2": 5}
        assert app(books, "reviews", vip, 5)["names"] == {"vip": 5}, "another namespace's connect is its own"
