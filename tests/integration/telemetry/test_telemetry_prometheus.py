"""Flagger's Istio queries and the chart's dashboard against a real Prometheus scraping live sidecars.

    client ──► frontend sidecar ══mTLS══► podinfo sidecar (STRICT) ──► app (answers /status/500 with 500)
               (reporter=source)          (reporter=destination, --workload podinfo --workload-namespace shop)
               also: route `canary` of host `reviews`, a rollout v1 → v2 between two demo backends

Prometheus (Debian's package) scrapes both sidecars' health ports every second with the chart's
scrape job (file discovery standing in for Kubernetes pod discovery, with the same meta labels).
Flagger's two queries are the upstream text (flagger_support), rendered for namespace `shop`
and target `podinfo` as Flagger renders them; the expected success rate is counted from the
answers the test itself got.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, replace

import pytest
import yaml
from dashboard_support import Target, run
from dashboard_support import load as load_dashboard
from flagger_support import (
    ISTIO_QUERIES,
    REQUEST_DURATION,
    REQUEST_SUCCESS_RATE,
    MetricTemplateModel,
    NoValuesFound,
    render,
    run_query,
    trim,
)
from mesh_support import EchoApp, https_get, make_mesh, plaintext_answer, tls_context, traffic_policy
from prometheus_support import PROMETHEUS, REPO, Prometheus, chart_scrape_job, free_port, pod_target
from rollout_support import cli, rollout_route, wait_for
from rollout_support import traffic as rollout_traffic
from sidecar_support import Backends, Client, policy, run_sidecar

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(PROMETHEUS is None, reason="needs Debian's prometheus (scripts/setup installs it)"),
]
NAMESPACE = "shop"
FRONTEND = f"spiffe://cluster.local/ns/{NAMESPACE}/sa/frontend"
PODINFO = f"spiffe://cluster.local/ns/{NAMESPACE}/sa/podinfo"
RATINGS = f"spiffe://cluster.local/ns/{NAMESPACE}/sa/ratings"
SERVICE = f"podinfo.{NAMESPACE}.svc.cluster.local"
FAILING_SHARE = 5  # every 5th request asks the app for a 500
TOTAL = f'sum(istio_requests_total{{reporter="destination", destination_workload_namespace="{NAMESPACE}", destination_workload="podinfo"}})'

# Flagger's own expectations for its renderer (pkg/metrics/observers/istio_test.go at flagger_support.FLAGGER_COMMIT).
FLAGGER_EXPECTED = {
    "request-success-rate": ' sum( rate( istio_requests_total{ reporter="destination", destination_workload_namespace="default", destination_workload=~"podinfo", response_code!~"5.*" }[1m] ) ) / sum( rate( istio_requests_total{ reporter="destination", destination_workload_namespace="default", destination_workload=~"podinfo" }[1m] ) ) * 100',
    "request-duration": ' histogram_quantile( 0.99, sum( rate( istio_request_duration_milliseconds_bucket{ reporter="destination", destination_workload_namespace="default", destination_workload=~"podinfo" }[1m] ) ) by (le) )',
}


def test_rendering_gives_what_flaggers_own_tests_expect():
    model = MetricTemplateModel(name="podinfo", namespace="default", target="podinfo", interval="1m", service="podinfo")
    for name, template in ISTIO_QUERIES.items():
        assert trim(render(template, model)) == FLAGGER_EXPECTED[name]
    with pytest.raises(ValueError, match='function "nope" not defined'):
        render("{{ nope }}", model)
    with_variables = replace(model, variables={"backend": "v2"})
    assert render('backend="{{ variables.backend }}"', with_variables) == 'backend="v2"'
    with pytest.raises(ValueError, match='no entry for key "route"'):
        render("{{ variables.route }}", with_variables)


def start_prometheus(tmp_path, *sidecars: tuple[str, int]) -> Prometheus:
    """Scrapes each (pod name, health port) as a Pod of NAMESPACE."""
    targets = tmp_path / "targets.yml"
    targets.write_text(yaml.safe_dump([pod_target("127.0.0.1", NAMESPACE, pod, port) for pod, port in sidecars]))
    prometheus = Prometheus(tmp_path / "prometheus", [chart_scrape_job(targets)])
    try:
        prometheus.wait_ready()
    except Exception:
        prometheus.stop()
        raise
    return prometheus


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, engine):
    """The two sidecars, their app and backends, and Prometheus scraping them; one set per engine."""
    root = tmp_path_factory.mktemp(f"dash-mesh-{engine}")
    ca = make_mesh(root)
    for name, spiffe_id in (("frontend", FRONTEND), ("podinfo", PODINFO), ("ratings", RATINGS)):
        ca.identity(name, spiffe_id)
    app, backends = EchoApp("podinfo"), Backends()
    backends.start("v1")
    backends.start("v2")
    health = {"podinfo": free_port(), "frontend": free_port()}
    compat = ("--metrics-compat", "istio", "--workload-namespace", NAMESPACE)
    try:
        callee_policy = traffic_policy("podinfo", SERVICE, "127.0.0.1:9", mode="STRICT", allow=(FRONTEND,))
        with run_sidecar(callee_policy, "--identity", str(root / "podinfo"), "--health", f"127.0.0.1:{health['podinfo']}",
                         *compat, "--workload", "podinfo", app_port=app.port) as callee:
            caller_policy = traffic_policy("podinfo", SERVICE, f"127.0.0.1:{callee.inbound[1]}", tls="mesh",
                                           identity=PODINFO) + "---\n" + policy(
                "reviews", {"v1": backends.port["v1"], "v2": backends.port["v2"]},
                rollout_route(steps="[50, 100]", interval="1s", min_requests=5))
            with run_sidecar(caller_policy, "--identity", str(root / "frontend"), "--health",
                             f"127.0.0.1:{health['frontend']}", *compat, "--workload", "frontend") as caller:
                prometheus = start_prometheus(root, ("podinfo-7d9f-abcde", health["podinfo"]),
                                              ("frontend-5c4b-fghij", health["frontend"]))
                try:
                    prometheus.wait_for("count(up == 1)", lambda r: r and r[0]["value"][1] == "2", "both sidecars scraped")
                    yield caller, callee, prometheus, ca
                finally:
                    prometheus.stop()
                assert "Traceback" not in caller.stderr() + callee.stderr()
    finally:
        app.close()
        backends.close()


def call_podinfo(client: Client, count: int) -> list[int]:
    """`count` calls through the frontend sidecar; every FAILING_SHARE-th asks for a 500. The codes got."""
    return [client.request(path="/status/500" if i % FAILING_SHARE == 0 else "/", host=SERVICE).status
            for i in range(count)]


@dataclass(frozen=True)
class Measured:
    """Traffic with a known success rate, and when Prometheus holds exactly its increase."""

    expected: float  # percent of the burst's requests not answered 5xx, as the client saw them
    interval: str  # Flagger's `interval`: a window from a quiet moment before the burst to one after
    at: float  # when to evaluate, at that window's end


@pytest.fixture(scope="module")
def measured(mesh) -> Measured:
    caller, _, prometheus, _ = mesh
    client = Client(caller.outbound)
    try:
        warm = call_podinfo(client, 50)
        prometheus.wait_for(TOTAL, lambda r: r and float(r[0]["value"][1]) == len(warm), "the warm-up to be scraped")
        # The window starts here: every series exists and is flat until the burst, so the
        # increase over the window is exactly the burst's, whatever rate() extrapolates.
        window_start = time.time() + 0.05
        time.sleep(1.3)  # at least one scrape of the flat warm-up values inside the window
        burst = call_podinfo(client, 200)
    finally:
        client.close()
    prometheus.wait_for(TOTAL, lambda r: r and float(r[0]["value"][1]) == len(warm) + len(burst), "the burst to be scraped")
    window = math.ceil(time.time() - window_start) + 1
    at = window_start + window
    time.sleep(max(0.0, at - time.time()) + 0.1)
    assert sorted(set(burst)) == [200, 500], burst  # what the app answered reached the client unchanged
    return Measured(100 * sum(code < 500 for code in burst) / len(burst), f"{window}s", at)


def test_flaggers_istio_queries_return_the_true_success_rate_and_a_finite_p99(mesh, measured):
    prometheus = mesh[2]
    model = MetricTemplateModel(name="podinfo", namespace=NAMESPACE, target="podinfo", interval=measured.interval)
    success_rate = run_query(prometheus, render(REQUEST_SUCCESS_RATE, model), measured.at)
    assert success_rate == pytest.approx(measured.expected, abs=1e-6), (success_rate, measured.expected)
    p99 = run_query(prometheus, render(REQUEST_DURATION, model), measured.at)
    assert math.isfinite(p99) and 0 < p99 < 1000, p99  # milliseconds; the app answers at once

    # The caller is no destination, and another namespace has no podinfo: Flagger would get no data.
    for other in (MetricTemplateModel("podinfo", NAMESPACE, "frontend", measured.interval),
                  MetricTemplateModel("podinfo", "default", "podinfo", measured.interval)):
        with pytest.raises(NoValuesFound):
            run_query(prometheus, render(REQUEST_SUCCESS_RATE, other), measured.at)


def readme_metric_template() -> str:
    """The query of the MetricTemplate the README shows."""
    blocks = re.findall(r"```yaml\n(.*?)```", (REPO / "README.md").read_text(), re.DOTALL)
    documents = [yaml.safe_load(b) for b in blocks if "kind: MetricTemplate" in b]
    assert len(documents) == 1, "the README shows one MetricTemplate"
    return documents[0]["spec"]["query"]


def test_the_readmes_metric_template_judges_the_canary_by_its_own_attempts(mesh, measured):
    """The frontend's route `all` sends every call to backend `b` (podinfo) without retries: its
    attempts' success rate is the clients'."""
    variables = {"route": "all", "backend": "b"}
    model = MetricTemplateModel("podinfo", NAMESPACE, "podinfo", measured.interval, variables=variables)
    success_rate = run_query(mesh[2], render(readme_metric_template(), model), measured.at)
    assert success_rate == pytest.approx(measured.expected, abs=1e-6), (success_rate, measured.expected)
    with pytest.raises(NoValuesFound):  # a backend that had no attempts: no data, not 0%
        run_query(mesh[2], render(readme_metric_template(), replace(model, variables={**variables, "backend": "v9"})),
                  measured.at)


# Rows whose every query finds data once the test below has run; the agent's needs a running
# `meshlet agent` (tests/integration/ebpf/test_ebpf_dashboard.py).
ROWS_WITH_DATA = ("Requests", "Progressive delivery", "Mutual TLS")


def test_every_dashboard_panel_runs_and_finds_the_data_this_mesh_made(mesh):
    caller, callee, prometheus, ca = mesh
    start = time.time()
    client = Client(caller.outbound)
    try:
        call_podinfo(client, 30)
    finally:
        client.close()
    # Refusals: a mesh identity podinfo does not allow (403 UAEX), a plaintext connection (no byte back).
    status, _ = https_get(callee.inbound, tls_context(ca.root / "ratings", ca.root / "ratings"))
    assert status == 403
    assert plaintext_answer(callee.inbound) == b""
    # A rollout on the frontend's route `canary`: v2 takes over, judged on its own attempts.
    assert cli(caller, "start").returncode == 0
    with rollout_traffic(caller):
        final = wait_for(caller, lambda s: s["phase"] != "Progressing", "the rollout to finish")
    assert (final["phase"], final["weight"]) == ("Succeeded", 100)
    prometheus.wait_for('meshlet_rollout_phase{phase="Succeeded"} == 1', bool, "the finished rollout to be scraped")
    time.sleep(2)  # a few more points after the last traffic

    results = run(prometheus, load_dashboard(), start, time.time())
    empty = [str(t) for t, series in results.items() if t.row.startswith(ROWS_WITH_DATA) and not series]
    assert not empty, f"no data: {empty}"

    for title in ("Canary against stable: success rate per backend", "Canary against stable: attempts per second"):
        assert {s["metric"]["backend"] for s in by_panel(results, title)} == {"v1", "v2"}, title
    assert SERVICE in {s["metric"]["destination_service"] for s in by_panel(results, "Requests per second by service")}
    refused = by_panel(results, "Requests refused by mTLS or authorization")
    assert RATINGS in {s["metric"]["source_principal"] for s in refused}
    handshakes = {(s["metric"]["direction"], s["metric"]["result"]) for s in by_panel(results, "mTLS handshakes by result")}
    assert {("outbound", "ok"), ("inbound", "ok"), ("inbound", "denied"), ("inbound", "plaintext")} <= handshakes


def by_panel(results: dict[Target, list[dict]], title: str) -> list[dict]:
    return [series for target, found in results.items() if target.panel == title for series in found]
