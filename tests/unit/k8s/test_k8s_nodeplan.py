"""The node agent's plan from cluster objects: Service resolution, scopes, per-Pod QoS classes,
what `auto` decides, and what a bad edit keeps. Pure: objects in, plan out."""

from __future__ import annotations

import copy
import itertools

import pytest

from meshlet.ebpf.kernel_split import namespace_scope
from meshlet.k8s.kubelet import pod_cgroups, pod_uid
from meshlet.k8s.nodeplan import ClusterState, Planner, Unresolved, pod_view, resolve, service_name, workload_name
from meshlet.policy import load_text
from meshlet.policy.model import Address

VERSIONS = itertools.count(1)


def traffic(name: str = "reviews", namespace: str = "shop", dataplane: str = "kernel", weights=(90, 10),
            route_extra: dict | None = None, **spec) -> dict:
    return {"apiVersion": "meshlet.dev/v1alpha1", "kind": "TrafficPolicy",
            "metadata": {"name": name, "namespace": namespace, "resourceVersion": str(next(VERSIONS))},
            "spec": {"host": name, "dataplane": dataplane,
                     "backends": {"v1": {"address": f"{name}-v1:9080"}, "v2": {"address": f"{name}-v2:9080"}},
                     "routes": [{"name": "canary", "to": [{"backend": "v1", "weight": weights[0]},
                                                          {"backend": "v2", "weight": weights[1]}],
                                 **(route_extra or {})}], **spec}}


def service(name: str, ip: str, *ports: int, namespace: str = "shop") -> tuple[tuple[str, str], dict]:
    return (namespace, name), {"metadata": {"name": name, "namespace": namespace},
                               "spec": {"clusterIP": ip, "ports": [{"port": p, "protocol": "TCP"} for p in ports]}}


SERVICES = dict([service("reviews", "10.96.0.10", 9080), service("reviews-v1", "10.96.0.11", 9080),
                 service("reviews-v2", "10.96.0.12", 9080)])


def pod(name: str, namespace: str = "shop", ip: str = "10.244.1.5", meshed: bool = True, labels=None,
        uid: str | None = None, **status) -> dict:
    annotations = {"meshlet.dev/status": "injected"} if meshed else {}
    return {"metadata": {"name": name, "namespace": namespace, "uid": uid or f"uid-{name}",
                         "labels": labels or {}, "annotations": annotations},
            "spec": {"containers": [{"name": "app"}]},
            "status": {"phase": "Running", "podIP": ip, **status}}


def state(policies=(), pods=(), services=SERVICES, qos=(), node_labels=None) -> ClusterState:
    return ClusterState(
        {(p["metadata"]["namespace"], p["metadata"]["name"]): p for p in policies},
        {q["metadata"]["name"]: q for q in qos}, services,
        {p["metadata"]["uid"]: p for p in pods}, node_labels or {})


def messages(plan) -> list[str]:
    return [str(p) for p in plan.problems]


def test_host_and_backends_resolve_to_cluster_ips_in_the_namespaces_scope():
    plan = Planner().plan(state([traffic()], [pod("frontend")]))
    (split,) = plan.splits
    assert split.vip == Address("10.96.0.10", 9080)
    assert [(b.backend, b.address, b.weight) for b in split.backends] == [
        ("v1", Address("10.96.0.11", 9080), 90), ("v2", Address("10.96.0.12", 9080), 10)]
    assert (split.namespace, split.scope) == ("shop", namespace_scope("shop"))
    assert [(m.name, m.scope) for m in plan.meshed] == [("frontend", namespace_scope("shop"))]
    assert 9080 in plan.ports


def test_a_namespace_without_meshed_pods_here_gets_no_split_and_scopes_differ():
    plan = Planner().plan(state([traffic(), traffic(namespace="books")], [pod("frontend", meshed=True)],
                                services={**SERVICES, **dict([service("reviews", "10.96.1.10", 9080, namespace="books"),
                                                              service("reviews-v1", "10.96.1.11", 9080, namespace="books"),
                                                              service("reviews-v2", "10.96.1.12", 9080, namespace="books")])}))
    assert [s.namespace for s in plan.splits] == ["shop"]
    assert namespace_scope("shop") != namespace_scope("books") and namespace_scope("shop") != 0


def test_auto_says_why_it_stays_in_the_proxy_and_kernel_failures_are_errors():
    planner = Planner()
    timed = traffic(dataplane="auto", route_extra={"timeout": "2s"})
    plan = planner.plan(state([timed], [pod("frontend")]))
    assert plan.splits == ()
    (note,) = plan.problems
    assert not note.error and str(note) == "trafficpolicy/shop/reviews: stays in the proxy: timeout needs the proxy"

    no_service = {k: v for k, v in SERVICES.items() if k != ("shop", "reviews-v2")}
    auto = planner.plan(state([traffic(dataplane="auto")], [pod("frontend")], no_service))
    assert auto.splits == () and not auto.problems[0].error
    assert "stays in the proxy: backend v2 address reviews-v2: no Service shop/reviews-v2" in messages(auto)[0]

    kernel = planner.plan(state([traffic()], [pod("frontend")], no_service))
    assert kernel.splits == () and kernel.problems[0].error
    assert messages(kernel) == ["trafficpolicy/shop/reviews: not split: backend v2 address reviews-v2: "
                                "no Service shop/reviews-v2"]


def test_a_bad_edit_or_a_lost_service_keeps_the_running_split():
    planner = Planner()
    good = traffic(weights=(70, 30))
    (split,) = planner.plan(state([good], [pod("frontend")])).splits
    bad = traffic(weights=(70, 40))
    plan = planner.plan(state([bad], [pod("frontend")]))
    assert plan.splits == (split,)
    (refused,) = messages(plan)  # located in the resource's JSON form (reconcile.policy_text)
    assert refused.startswith("trafficpolicy/shop/reviews: refused, keeping the previous version: ")
    assert refused.endswith(": route 'canary': weights sum to 110, must be 100")
    lost = {k: v for k, v in SERVICES.items() if k != ("shop", "reviews-v1")}
    kept = planner.plan(state([good], [pod("frontend")], lost))
    assert kept.splits == (split,)
    assert messages(kept)[0].startswith("trafficpolicy/shop/reviews: keeping the previous split: ")
    deleted = planner.plan(state([], [pod("frontend")]))
    assert deleted.splits == () and deleted.problems == ()


def test_two_policies_claiming_one_address_in_a_namespace_refuse_the_later_name():
    other = traffic(name="ratings", vip="10.96.0.10:9080")
    other["spec"]["backends"] = {"v1": {"address": "reviews-v1:9080"}, "v2": {"address": "reviews-v2:9080"}}
    plan = Planner().plan(state([traffic(), other], [pod("frontend")]))
    assert [s.policy for s in plan.splits] == ["ratings"]
    assert messages(plan) == ["trafficpolicy/shop/reviews: not split: ratings already splits 10.96.0.10:9080 "
                              "in namespace shop"]


def test_resolution_errors_name_what_is_missing():
    policy = load_text("""
apiVersion: meshlet.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews.shop.svc.cluster.local
  dataplane: kernel
  backends: {v1: {address: "reviews-v1:9081"}, v2: {address: "10.1.2.3:80"}}
  routes: [{name: all, to: [{backend: v1, weight: 50}, {backend: v2, weight: 50}]}]
""").traffic[0]
    with pytest.raises(Unresolved, match=r"backend v1: Service reviews-v1 has no TCP port 9081 \(it has 9080\)"):
        resolve(policy, SERVICES)
    two_ports = {**SERVICES, **dict([service("reviews", "10.96.0.10", 9080, 9443)]),
                 **dict([service("reviews-v1", "10.96.0.11", 9081)])}
    with pytest.raises(Unresolved, match=r"its Service has TCP ports 9080, 9443; set spec\.vip"):
        resolve(policy, two_ports)
    headless = {**two_ports, ("shop", "reviews"): {"spec": {"clusterIP": "None", "ports": [{"port": 9080}]}}}
    with pytest.raises(Unresolved, match=r"Service shop/reviews has no IPv4 ClusterIP \(None\)"):
        resolve(policy, headless)
    resolved, vip = resolve(policy, {**two_ports, **dict([service("reviews", "10.96.0.10", 9080)])})
    assert vip == Address("10.96.0.10", 9080)
    assert [b.address for b in resolved.backends] == [Address("10.96.0.11", 9081), Address("10.1.2.3", 80)]


@pytest.mark.parametrize(("host", "found"), [
    ("reviews", ("shop", "reviews")), ("reviews.books", ("books", "reviews")),
    ("reviews.books.svc", ("books", "reviews")), ("reviews.books.svc.cluster.local", ("books", "reviews")),
    ("api.example.com", None),
])
def test_service_names_read_as_cluster_dns_does(host, found):
    assert service_name(host, "shop") == found


QOS = {"apiVersion": "meshlet.dev/v1alpha1", "kind": "QoSPolicy",
       "metadata": {"name": "node", "resourceVersion": "1"},
       "spec": {"interface": "eth0", "classes": {
           "latency": {"priority": 0, "rate": "5mbit", "ceil": "10mbit", "slo": {"p99": "30ms"},
                       "podSelector": {"matchLabels": {"tier": "frontend"}}},
           "default": {"priority": 1, "rate": "1mbit", "ceil": "10mbit"},
           "bulk": {"priority": 2, "rate": "1mbit", "ceil": "10mbit", "ports": [9000],
                    "podSelector": {"matchExpressions": [{"key": "tier", "operator": "In",
                                                          "values": ["batch", "frontend"]}]}}}}}


def test_pods_get_the_class_their_labels_choose_the_lowest_priority_first():
    pods = [pod("web", ip="10.244.1.2", labels={"tier": "frontend"}, meshed=False),
            pod("etl", ip="10.244.1.3", labels={"tier": "batch"}),
            pod("misc", ip="10.244.1.4"),
            pod("gone", ip="10.244.1.5", labels={"tier": "batch"}, phase="Succeeded"),
            pod("host", ip="192.168.0.1", labels={"tier": "batch"}) | {"spec": {"hostNetwork": True,
                                                                              "containers": [{"name": "a"}]}}]
    plan = Planner().plan(state(pods=pods, qos=[QOS]))
    assert plan.qos is not None and plan.qos.metadata.name == "node"
    assert plan.pod_classes == {"10.244.1.2": "latency", "10.244.1.3": "bulk"}
    assert plan.workloads["10.244.1.4"].qos_class == "" and plan.workloads["10.244.1.2"].workload == "web"
    assert set(plan.workloads) == {"10.244.1.2", "10.244.1.3", "10.244.1.4"}
    assert 9000 in plan.ports


def test_node_selectors_choose_the_policy_and_an_overlap_keeps_the_one_followed():
    gpu = copy.deepcopy(QOS)
    gpu["metadata"]["name"] = "gpu"
    gpu["spec"]["nodeSelector"] = {"matchLabels": {"pool": "gpu"}}
    planner = Planner()
    assert planner.plan(state(qos=[QOS, gpu], node_labels={"pool": "gpu"})).problems != ()
    only = planner.plan(state(qos=[gpu], node_labels={"pool": "gpu"}))
    assert only.qos.metadata.name == "gpu" and only.problems == ()
    both = planner.plan(state(qos=[QOS, gpu], node_labels={"pool": "gpu"}))
    assert both.qos.metadata.name == "gpu"
    assert messages(both) == ["qospolicy/node: not applied: QoSPolicies gpu, node all select this node; "
                              "give them nodeSelectors that do not overlap"]
    assert planner.plan(state(qos=[QOS, gpu], node_labels={"pool": "cpu"})).qos.metadata.name == "node"


def test_an_invalid_qos_policy_is_refused_with_its_location():
    bad = copy.deepcopy(QOS)
    bad["spec"]["classes"]["bulk"]["podSelector"] = {"matchExpressions": [{"key": "tier", "operator": "In"}]}
    plan = Planner().plan(state(qos=[bad]))
    assert plan.qos is None
    (refused,) = messages(plan)
    assert refused.startswith("qospolicy/node: refused, not applied: ")
    assert refused.endswith(": QoSPolicy 'node' spec.classes.bulk.podSelector.matchExpressions[0]: "
                            "operator In needs values")


def test_workload_names_follow_the_controller():
    deployment = {"name": "web-7d9f8b6c5d-x2x9z", "labels": {"pod-template-hash": "7d9f8b6c5d"},
                  "ownerReferences": [{"kind": "ReplicaSet", "name": "web-7d9f8b6c5d", "controller": True}]}
    assert workload_name(deployment) == "web"
    assert workload_name({"name": "db-0", "ownerReferences": [{"kind": "StatefulSet", "name": "db",
                                                                "controller": True}]}) == "db"
    assert workload_name({"name": "debug"}) == "debug"


def test_pod_view_takes_an_ipv4_address_from_pod_ips():
    dual = pod("web", ip="fd00::5", podIPs=[{"ip": "fd00::5"}, {"ip": "10.244.1.9"}])
    assert pod_view(dual).ip == "10.244.1.9"
    assert pod_view(pod("web", phase="Failed")) is None


def test_pod_cgroups_are_found_for_both_kubelet_drivers(tmp_path):
    uid = "0f3c5a9e-1b2d-4c6e-8f00-123456789abc"
    systemd = tmp_path / "kubepods.slice"
    (systemd / "kubepods-burstable.slice" / f"kubepods-burstable-pod{uid.replace('-', '_')}.slice" / "cri-1").mkdir(
        parents=True)
    (systemd / "kubepods-podaaaaaaaa_bbbb_cccc_dddd_eeeeeeeeeeee.slice").mkdir()
    found = pod_cgroups(systemd)
    assert found[uid].name == f"kubepods-burstable-pod{uid.replace('-', '_')}.slice"
    assert found["aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"].parent == systemd
    cgroupfs = tmp_path / "kubepods"
    (cgroupfs / "besteffort" / f"pod{uid}").mkdir(parents=True)
    assert pod_cgroups(cgroupfs) == {uid: cgroupfs / "besteffort" / f"pod{uid}"}
    assert pod_uid("kubepods-burstable.slice") is None and pod_cgroups(tmp_path / "absent") == {}
