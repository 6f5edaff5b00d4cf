"""QoS per workload in a cluster: a QoSPolicy watched by `meshlet agent --kube` puts each of the
node's Pods in the class its labels choose, by the Pod's address on the node's uplink, under
contention. Two Pods share the uplink (HTB, 10 Mbit/s): while both are in one class a bulk
flood queues the other Pod's small requests behind it; once its label puts it in the latency
class its requests pass the flood. Real TCP, real HTB and classifier; the API server is
`fake_apiserver.FakeApiServer` (the one faked part).
"""

from __future__ import annotations

import socket
import statistics
import subprocess
import threading
import time

import pytest
from node_support import NEEDS, SERVICE_HOST, Flood, Pinger, cluster_node, echo, inside, sink
from pyroute2 import IPRoute

from meshlet.ebpf import tc

pytestmark = [*NEEDS, pytest.mark.timeout(180)]
LATENCY, DEFAULT, BULK = 0x10010, 0x10011, 0x10012


def qos_policy(interface: str) -> dict:
    return {"apiVersion": "meshlet.dev/v1alpha1", "kind": "QoSPolicy", "metadata": {"name": "node"},
            "spec": {"interface": interface, "classes": {
                "latency": {"priority": 0, "rate": "5mbit", "ceil": "10mbit", "slo": {"p99": "50ms"},
                            "podSelector": {"matchLabels": {"tier": "web"}}},
                "default": {"priority": 1, "rate": "1mbit", "ceil": "10mbit"},
                "bulk": {"priority": 2, "rate": "1mbit", "ceil": "10mbit",
                         "podSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["batch"]}]}},
            }}}


def class_bytes(node) -> dict[int, int]:
    with IPRoute(netns=node.netns) as ipr:
        return tc.class_bytes(ipr, ipr.link_lookup(ifname=node.uplink)[0])


def rtts(pinger: Pinger, since: float) -> list[float]:
    return [rtt for at, rtt in pinger.rtts if at >= since]


def test_a_pods_label_chooses_its_class_under_contention(tmp_path):
    with cluster_node(tmp_path) as node:
        web, etl = node.pod("web", labels={"app": "web"}), node.pod("etl", labels={"app": "etl"})
        for pod in (web, etl):
            node.publish(pod)
        node.api.put(qos_policy(node.uplink))
        with inside(node.services):
            sink_server = socket.create_server((SERVICE_HOST, 0))
            echo_server = socket.create_server((SERVICE_HOST, 0))
        threading.Thread(target=sink, args=(sink_server,), daemon=True).start()
        threading.Thread(target=echo, args=(echo_server,), daemon=True).start()
        agent = node.agent()
        agent.wait_for_log(f"qos: add class 1:12 bulk rate 1000000bit ceil 10000000bit prio 2 on {node.uplink}")
        flood = pinger = None
        try:
            pinger = Pinger(web.netns, (SERVICE_HOST, echo_server.getsockname()[1]))
            flood = Flood(etl.netns, (SERVICE_HOST, sink_server.getsockname()[1]))
            time.sleep(3)  # both unlabelled for a class: one default queue, the flood fills it
            shared = rtts(pinger, time.monotonic() - 2)
            before = class_bytes(node)
            assert before[DEFAULT] > 1_000_000 and before.get(LATENCY, 0) < 10_000 and before.get(BULK, 0) < 10_000
            assert shared and max(shared) > 0.1, f"the flood should queue the web Pod's requests: {shared}"

            web.labels["tier"], etl.labels["tier"] = "web", "batch"
            node.publish(web)
            node.publish(etl)
            agent.wait_for_log(f"qos: Pods by class on {node.uplink} now bulk=1 latency=1")
            settled = time.monotonic() + 1.5  # what was queued before drains
            time.sleep(4.5)
            apart = rtts(pinger, settled)
            after = class_bytes(node)
            assert apart and statistics.median(apart) < 0.03, f"in its own class the flood no longer delays it: {apart}"
            assert after[BULK] - before.get(BULK, 0) > 1_000_000, "the batch Pod's flood moved to bulk"
            assert after[LATENCY] - before.get(LATENCY, 0) > 1000, "the web Pod's requests moved to latency"
        finally:
            for traffic in (flood, pinger):
                if traffic is not None:
                    traffic.stop()
            sink_server.close()
            echo_server.close()
        found = agent.metrics()
        web_srtt = ("meshlet_tcp_srtt_seconds_count", (("direction", "out"), ("namespace", "shop"), ("port", ""),
                                                        ("workload", "web")))
        assert found.get(web_srtt, 0) > 0, "the web Pod's RTT is measured as its workload's, the class loop's input"
        assert found[("meshlet_qos_class_rate_bits", (("class", "bulk"),))] > 0

        node.api.delete("qospolicies", "", "node")  # the policy goes: so does the shaping
        agent.wait_for_log(f"agent: removed clsact=True htb=True from {node.uplink}")
        assert agent.stop() == 0, agent.text()
        assert "Traceback" not in agent.text()


def test_a_policy_for_an_interface_not_there_yet_is_one_error_then_applies(tmp_path):
    with cluster_node(tmp_path) as node:
        later = f"agt{node.tag}l"
        node.api.put(qos_policy(later))
        agent = node.agent()
        missing = f"agent: qospolicy/node: not applied, no shaping: interface {later} not found (QoSPolicy node)"
        agent.wait_for_log(missing)
        errors = ("meshlet_agent_policy_errors_total", (("kind", "QoSPolicy"), ("namespace", ""), ("policy", "node")))
        assert agent.metrics()[errors] == 1
        subprocess.run(["ip", "-n", node.netns, "link", "add", later, "type", "veth", "peer", "name", f"{later}p"],
                       check=True, timeout=30)  # no dummy driver in this kernel
        agent.wait_for_log(f"qos: create-root htb 1: default 1:11 on {later}")
        assert agent.text().count(missing) == 1, "tried again every interval, said once"
        assert agent.metrics()[errors] == 1
        assert agent.stop() == 0
