"""Injection and the Pod's own Prometheus target (metrics merging), and the workload name it gives the sidecar."""

from __future__ import annotations

import dataclasses
import json

import pytest

from meshlet.k8s.inject import inject_pod
from meshlet.k8s.scrape import MERGE_ANNOTATION, RECORD, plan
from meshlet.k8s.sidecar import InjectConfig
from meshlet.k8s.workload import workload_name

CFG = InjectConfig()
PRODUCTPAGE = {"prometheus.io/scrape": "true", "prometheus.io/port": "9080", "prometheus.io/path": "/metrics"}
SIDECAR = {"prometheus.io/scrape": "true", "prometheus.io/port": "15020", "prometheus.io/path": "/metrics"}


def pod(annotations: dict[str, str] | None = None, **metadata: object) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "productpage-v1-7d9f-x2k", "annotations": annotations or {}, **metadata},
            "spec": {"containers": [{"name": "productpage", "image": "pp", "ports": [{"containerPort": 9080}]}]}}


def args_of(obj: dict) -> list[str]:
    return next(c for c in obj["spec"]["initContainers"] if c["name"] == "meshlet-proxy")["args"]


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


class TestPlan:
    def test_the_apps_target_moves_into_the_sidecar(self):
        result = plan({**PRODUCTPAGE, "team": "books"}, CFG)
        assert result.app_metrics == "http://127.0.0.1:9080/metrics"
        record = {"annotations": PRODUCTPAGE, "port": "15020"}
        assert result.annotations == {"team": "books", **SIDECAR, RECORD: json.dumps(record, sort_keys=True)}

    def test_injecting_again_finds_the_apps_target_not_the_sidecars(self):
        once = plan(PRODUCTPAGE, CFG)
        assert plan(once.annotations, CFG) == once
        moved = dataclasses.replace(CFG, health_port=15021)  # re-injected with another health port
        again = plan(once.annotations, moved)
        assert again.app_metrics == "http://127.0.0.1:9080/metrics"
        assert again.annotations["prometheus.io/port"] == "15021"

    def test_a_port_changed_after_injection_is_the_apps_new_one(self):
        once = plan(PRODUCTPAGE, CFG).annotations
        assert plan({**once, "prometheus.io/port": "9100"}, CFG).app_metrics == "http://127.0.0.1:9100/metrics"

    def test_every_spelling_prometheus_reads_is_replaced(self):
        """`prometheus-io/port` is `prometheus.io/port` to pod discovery: leaving it would race ours."""
        result = plan({"prometheus-io/port": "8000", "prometheus.io/scheme": "https", "prometheus_io/path": "/m"}, CFG)
        assert result.app_metrics == "https://127.0.0.1:8000/m"
        assert {k for k in result.annotations if k != RECORD} == set(SIDECAR)
        assert plan(result.annotations, CFG) == result

    def test_scrape_false_is_left_alone(self):
        result = plan({"prometheus.io/scrape": "false", "prometheus.io/port": "9080"}, CFG)
        assert result.annotations == {"prometheus.io/scrape": "false", "prometheus.io/port": "9080"}
        assert result.app_metrics is None
        assert plan({"prometheus.io/scrape": "false"}, CFG).annotations == {"prometheus.io/scrape": "false"}

    def test_opting_out_keeps_the_apps_annotations(self):
        for declared, cfg in (({**PRODUCTPAGE, MERGE_ANNOTATION: "false"}, CFG),
                              (PRODUCTPAGE, dataclasses.replace(CFG, merge_metrics=False))):
            result = plan(declared, cfg)
            assert result.annotations == declared and result.app_metrics is None
        injected = plan(PRODUCTPAGE, CFG).annotations  # opting out after injection restores them
        assert plan({**injected, MERGE_ANNOTATION: "false"}, CFG).annotations == {**PRODUCTPAGE,
                                                                                   MERGE_ANNOTATION: "false"}

    def test_no_target_of_its_own_gets_the_sidecars(self):
        assert plan({}, CFG).annotations == SIDECAR
        assert plan({MERGE_ANNOTATION: "false"}, CFG).annotations == {MERGE_ANNOTATION: "false", **SIDECAR}
        assert plan({"prometheus.io/scrape": "true"}, CFG).app_metrics is None

    @pytest.mark.parametrize(("annotations", "error"), [
        ({"prometheus.io/port": "http"}, "prometheus.io/port: 'http' is not a port"),
        ({"prometheus.io/port": "15000"}, "15000 is a sidecar port"),
        ({"prometheus.io/port": "9080", "prometheus.io/scheme": "grpc"}, "neither http nor https"),
        ({"prometheus.io/port": "9080", "prometheus.io/path": "metrics"}, "is not a URL path"),
        ({"prometheus.io/port": "9080", "prometheus.io/path": "/a b"}, "is not a URL path"),
    ])
    def test_a_bad_target_is_refused_with_its_annotation(self, annotations, error):
        with pytest.raises(ValueError, match=error):
            plan(annotations, CFG)
        result = inject_pod(pod(annotations), CFG)
        assert result.outcome == "cannot-inject" and error.split(":")[0] in result.reason


class TestInjectedArgs:
    def test_a_pod_gets_its_workload_namespace_compat_and_app_metrics(self):
        result = inject_pod(pod(PRODUCTPAGE, labels={"app": "productpage"}), CFG)
        args = args_of(result.obj)
        assert flag(args, "--workload") == "productpage"
        assert flag(args, "--workload-namespace") == "$(POD_NAMESPACE)"
        assert flag(args, "--metrics-compat") == "istio"
        assert flag(args, "--app-metrics") == "http://127.0.0.1:9080/metrics"
        container = next(c for c in result.obj["spec"]["initContainers"] if c["name"] == "meshlet-proxy")
        assert {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}} in container["env"]
        again = inject_pod(result.obj, CFG)
        assert again.outcome == "unchanged"

    def test_without_a_target_there_is_no_app_metrics_flag(self):
        assert "--app-metrics" not in args_of(inject_pod(pod(), CFG).obj)


class TestWorkloadName:
    @pytest.mark.parametrize(("labels", "expected"), [
        ({"app.kubernetes.io/name": "shop", "app": "legacy"}, "shop"),
        ({"app": "productpage"}, "productpage"),
    ])
    def test_labels_first(self, labels, expected):
        template = {"metadata": {"labels": labels}}
        assert workload_name({"metadata": {"name": "productpage-v1"}}, template, "Deployment") == expected

    def test_a_workload_in_a_file_is_named_by_its_metadata(self):
        assert workload_name({"metadata": {"name": "productpage-v1"}}, {}, "Deployment") == "productpage-v1"

    @pytest.mark.parametrize(("owner", "labels", "expected"), [
        ({"kind": "ReplicaSet", "name": "productpage-v1-7d9f6b5c8", "controller": True},
         {"pod-template-hash": "7d9f6b5c8"}, "productpage-v1"),
        ({"kind": "Job", "name": "nightly-report-29011440", "controller": True}, {}, "nightly-report"),
        ({"kind": "StatefulSet", "name": "ratings-db", "controller": True}, {}, "ratings-db"),
        ({"kind": "ReplicaSet", "name": "not-the-controller"}, {}, "web"),
    ])
    def test_a_pod_is_named_by_its_controller(self, owner, labels, expected):
        meta = {"generateName": "web-", "ownerReferences": [owner], "labels": labels}
        assert workload_name({"metadata": meta}, {"metadata": meta}, "Pod") == expected

    def test_a_bare_pod_is_named_by_itself(self):
        assert workload_name({"metadata": {"name": "debug"}}, {}, "Pod") == "debug"
        assert workload_name({"metadata": {}}, {}, "Pod") == "unknown"
