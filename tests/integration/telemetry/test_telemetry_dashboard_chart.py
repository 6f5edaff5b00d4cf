"""The Grafana dashboard the chart ships: rendered by the real `helm` into a ConfigMap that
Grafana's dashboard sidecar picks up by label, valid JSON, every panel with PromQL on the
`datasource` variable. Whether that PromQL runs and finds data: test_telemetry_prometheus.py
(sidecars) and tests/integration/ebpf/test_ebpf_dashboard.py (the agent)."""

from __future__ import annotations

import json
import subprocess

import pytest
from dashboard_support import BUILTINS, DASHBOARD, load, panels, query_variables, targets, used_variables
from test_k8s_helm import CHART, HELM, find, render

pytestmark = pytest.mark.skipif(HELM is None, reason="needs the helm binary (scripts/setup installs it into .venv/bin)")
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def test_chart_renders_the_dashboard_configmap_for_grafanas_sidecar():
    config = find(render(), "ConfigMap", "mesh-meshlet-dashboard")
    assert config["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config["metadata"]["namespace"] == "meshlet-system"
    assert json.loads(config["data"]["meshlet.json"]) == load()
    assert config["data"]["meshlet.json"] == DASHBOARD.read_text().rstrip("\n")


def test_dashboard_toggle_namespace_labels_and_annotations():
    assert not [d for d in render("monitoring.grafanaDashboard.enabled=false") if d["metadata"]["name"].endswith("-dashboard")]
    config = find(render("monitoring.grafanaDashboard.namespace=monitoring", "monitoring.grafanaDashboard.labels.team=mesh",
                         "monitoring.grafanaDashboard.annotations.grafana_folder=meshlet"), "ConfigMap", "mesh-meshlet-dashboard")
    assert config["metadata"]["namespace"] == "monitoring"
    assert config["metadata"]["labels"]["grafana_dashboard"] == "1" and config["metadata"]["labels"]["team"] == "mesh"
    assert config["metadata"]["annotations"] == {"grafana_folder": "meshlet"}


def test_every_panel_queries_prometheus_through_the_datasource_variable():
    dashboard = load()
    assert dashboard["uid"] and dashboard["id"] is None  # provisioned: Grafana assigns the id
    datasource = next(v for v in dashboard["templating"]["list"] if v["name"] == "datasource")
    assert (datasource["type"], datasource["query"]) == ("datasource", "prometheus")
    found = list(panels(dashboard))
    assert len({p["id"] for _, p in found}) == len(found)
    for row, panel in found:
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], f"{row} / {panel['title']}: no target"
        assert all(t["datasource"] == DATASOURCE and t["expr"].strip() for t in panel["targets"]), panel["title"]
    defined = set(query_variables(dashboard)) | set(BUILTINS)
    for target in targets(dashboard):
        assert used_variables(target.expr) <= defined, target
    for name, query in query_variables(dashboard).items():
        assert used_variables(query) <= defined - {name}, name


def test_the_panels_the_issue_asks_for_are_there():
    by_row: dict[str, list[str]] = {}
    for target in targets(load()):
        by_row.setdefault(target.row.split(" (")[0], []).append(target.expr)
    requests, rollouts, mtls, agent = (" ".join(by_row[r]) for r in ("Requests", "Progressive delivery", "Mutual TLS",
                                                                       "Node agent"))
    assert "rate(istio_requests_total{" in requests
    assert all(f"histogram_quantile({q}, sum by (le, destination_service)" in requests for q in ("0.5", "0.9", "0.99"))
    assert "meshlet_rollout_weight" in rollouts and "meshlet_upstream_requests_total" in rollouts
    assert "meshlet_mtls_handshakes_total" in mtls and "by (direction, result)" in mtls
    assert all(name in agent for name in ("meshlet_tcp_connect_latency_seconds_bucket", "meshlet_tcp_srtt_seconds_bucket",
                                          "meshlet_qos_adjustments_total", "meshlet_qos_class_rate_bits"))


def test_a_label_value_that_is_not_a_string_is_refused_with_its_path():
    result = subprocess.run([HELM, "template", "mesh", str(CHART), "--set", "monitoring.grafanaDashboard.labels.grafana_dashboard=1"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "/monitoring/grafanaDashboard/labels/grafana_dashboard" in result.stderr  # `--set-string` passes it
