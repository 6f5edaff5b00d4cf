"""`meshlet agent --kube --accelerate`: hooks follow the node's meshed Pods as they come and go,
and nothing is left behind or attached twice across a Pod deleted under its hooks, a node with
no meshed Pods, SIGTERM, and a kill -9 followed by a restart that adopts the pins.

Pods are network namespaces and kubelet-named cgroups running tests/integration/accel/workload.py;
the API server is `fake_apiserver.FakeApiServer` (the one faked part: no kube-apiserver here).
"""

from __future__ import annotations

import signal
import sys

import pytest
from node_support import (
    CGROUP_INET4_CONNECT,
    CGROUP_INET4_GETPEERNAME,
    CGROUP_SOCK_OPS,
    HTTP_BACKENDS,
    NEEDS,
    app,
    attached,
    cluster_node,
)

pytestmark = [*NEEDS, pytest.mark.timeout(180)]

ATTACHED, DETACHED = "agent: hooks attached to pod shop/{}", "agent: hooks detached from pod shop/{}"
REDIRECTED = ("meshlet_accel_redirected_bytes_total", ())
HOOKED = ("meshlet_agent_hooked_cgroups", ())


def reviews(dataplane: str) -> dict:
    return {"apiVersion": "meshlet.dev/v1alpha1", "kind": "TrafficPolicy",
            "metadata": {"name": "reviews", "namespace": "shop"},
            "spec": {"host": "reviews", "dataplane": dataplane, "backends": {"v1": {"address": "reviews-v1:9080"}},
                     "routes": [{"name": "all", "to": [{"backend": "v1"}]}]}}


def pins(node) -> list[str]:
    return sorted(p.name for p in node.pin_base.iterdir()) if node.pin_base.exists() else []


def test_acceleration_follows_the_pods_of_the_node(tmp_path):
    with cluster_node(tmp_path) as node:
        a, b = node.pod("a"), node.pod("b")
        wa, wb = node.workload(a), node.workload(b)
        pa, pb = wa.call("listen")["port"], wb.call("listen")["port"]
        agent = node.agent("--accelerate", "--sidecar-ports", f"{pa},{pb}")

        # A node with no meshed Pods holds no hook, map or pin of the accelerations.
        assert pins(node) == ["agent"]
        assert agent.metrics()[HOOKED] == 0
        assert attached(a.cgroup, CGROUP_SOCK_OPS) == ()

        node.publish(a)
        agent.wait_for_log(ATTACHED.format("a"))
        (program,) = attached(a.cgroup, CGROUP_SOCK_OPS)
        assert wa.call(f"exchange {pa} 65536")["exact"]
        assert agent.metrics()[REDIRECTED] == 2 * 65536, "the Pod's loopback bytes skipped the TCP stack"

        node.publish(b)
        agent.wait_for_log(ATTACHED.format("b"))
        assert attached(b.cgroup, CGROUP_SOCK_OPS) == (program,), "one program for the node, attached per Pod"
        assert wb.call(f"exchange {pb} 1000")["exact"]
        assert agent.metrics()[REDIRECTED] == 2 * 65536 + 2000

        node.unpublish(a)  # deleted while its cgroup still runs (graceful termination is over)
        agent.wait_for_log(DETACHED.format("a"))
        assert attached(a.cgroup, CGROUP_SOCK_OPS) == ()
        assert wa.call(f"exchange {pa} 1000")["exact"]
        assert agent.metrics()[REDIRECTED] == 2 * 65536 + 2000, "a Pod that left is not accelerated"

        node.remove_pod_cgroup(b)  # the kubelet removes the Pod's cgroup with the hooks on it...
        node.unpublish(b)  # ...then the API server says it is gone
        agent.wait_for_log(DETACHED.format("b"))
        assert agent.metrics()[HOOKED] == 0
        assert pins(node) == ["agent"], "the last Pod gone: the sockmap program and its maps go too"
        assert agent.stop() == 0, agent.text()
        assert pins(node) == [] and "Traceback" not in agent.text()


def test_kill_9_then_restart_adopts_the_pins_and_attaches_nothing_twice(tmp_path):
    with cluster_node(tmp_path) as node:
        vip = node.service("reviews", 10)
        v1 = node.service("reviews-v1", 11)
        node.start([sys.executable, "-c", HTTP_BACKENDS, f"vip,{vip},9080", f"v1,{v1},9080"], node.services)
        node.api.put(reviews("kernel"))
        a, c = node.pod("a"), node.pod("c")
        wa = node.workload(a)
        port = wa.call("listen")["port"]
        for pod in (a, c):
            node.publish(pod)
        first = node.agent("--accelerate", "--sidecar-ports", str(port))
        first.wait_for_log(ATTACHED.format("c"))
        held = wa.call(f"open {port}")  # accelerated, and must survive all that follows
        old = {t: attached(a.cgroup, t) for t in (CGROUP_SOCK_OPS, CGROUP_INET4_CONNECT, CGROUP_INET4_GETPEERNAME)}
        assert all(len(ids) == 1 for ids in old.values())

        first.stop(signal.SIGKILL)
        assert {t: attached(a.cgroup, t) for t in old} == old, "a crash leaves the hooks working"
        assert pins(node) == ["accel", "agent", "split"]
        c.meshed = False  # while no agent runs, Pod c stops being meshed: its hooks are stale
        node.publish(c)

        second = node.agent("--accelerate", "--sidecar-ports", str(port))
        second.wait_for_log("removed a previous agent's accel hooks from")
        assert "accel: loaded (adopted maps" in second.text() and "split: loaded (adopted maps" in second.text()
        for attach_type, ids in old.items():
            now = attached(a.cgroup, attach_type)
            assert len(now) == 1 and now != ids, "replaced, not attached a second time"
            assert attached(c.cgroup, attach_type) == (), "the no-longer-meshed Pod's hooks were swept"
        assert wa.call(f"ask {held['id']}")["name"] == "?", "the held connection is still redirected"
        assert app(a, "reviews", vip, 5)["names"] == {"v1": 5}, "the adopted split"
        assert app(c, "reviews", vip, 5)["names"] == {"vip": 5}
        wa.call(f"close {held['id']}")

        assert second.stop() == 0, second.text()
        for attach_type in old:
            assert attached(a.cgroup, attach_type) == ()
        assert pins(node) == [], "SIGTERM removes every pin"
        assert "Traceback" not in second.text()


def test_a_restart_that_needs_neither_lever_removes_what_the_dead_agent_left(tmp_path):
    """Killed with both levers on; meanwhile the policy went back to the proxy, and the new agent
    runs without --accelerate: none of the dead agent's hooks or maps may keep working."""
    with cluster_node(tmp_path) as node:
        vip, v1 = node.service("reviews", 10), node.service("reviews-v1", 11)
        node.start([sys.executable, "-c", HTTP_BACKENDS, f"vip,{vip},9080", f"v1,{v1},9080"], node.services)
        node.api.put(reviews("kernel"))
        a = node.pod("a")
        node.publish(a)
        first = node.agent("--accelerate")
        first.wait_for_log(ATTACHED.format("a"))
        assert app(a, "reviews", vip, 3)["names"] == {"v1": 3}
        first.stop(signal.SIGKILL)
        node.api.put(reviews("proxy"))

        second = node.agent()
        second.wait_for_log("agent: freed a previous agent's split maps")
        for attach_type in (CGROUP_SOCK_OPS, CGROUP_INET4_CONNECT, CGROUP_INET4_GETPEERNAME):
            assert attached(a.cgroup, attach_type) == ()
        assert pins(node) == ["agent"]
        assert app(a, "reviews", vip, 3)["names"] == {"vip": 3}, "the stale split is gone with its maps"
        assert second.stop() == 0 and pins(node) == []


def test_a_wrong_node_name_is_one_line_and_leaves_nothing(tmp_path):
    """A typo in --node would otherwise be a node that silently has no Pods."""
    with cluster_node(tmp_path) as node:
        agent = node.agent("--node", "agt-nosuch", ready=False)  # the last --node wins
        assert agent.process.wait(timeout=60) == 1
        assert agent.text().splitlines()[-1] == \
            "meshlet: agent: node agt-nosuch not found: --node (or $NODE_NAME) must name this node"
        assert pins(node) == [] and "Traceback" not in agent.text()
