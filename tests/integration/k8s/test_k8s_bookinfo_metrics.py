"""Istio's Bookinfo productpage, injected: a real Prometheus still sees its own metrics, and the sidecar's.

Bookinfo's productpage Deployment (tests/unit/k8s/manifests/productpage.yaml, as Istio ships
it) declares its own metrics with `prometheus.io/port: "9080"`. `meshlet inject` points those
annotations at the sidecar and moves the target into `--app-metrics`. Here the injected Pod
is a network namespace: the real productpage (tests/integration/k8s/bookinfo, unchanged) on
9080, the injected sidecar with the injected arguments, as the sidecar's UID. Only what needs
a cluster is replaced, and said so: `--watch-kube` becomes `--policy FILE` (no API server),
the kubelet's work is done by hand (`$(POD_NAMESPACE)` expanded, the Downward API's labels
file written), and Prometheus' Kubernetes pod discovery becomes file discovery carrying the
same `__meta_kubernetes_pod_annotation_*` labels. Prometheus (Debian's) runs in a peer
namespace and scrapes the Pod IP with the chart's own scrape job, as in a cluster.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from podnet_support import NEEDS, POD_IP, PodNet, pod_network, sh

from meshlet.k8s import sidecar
from meshlet.k8s.inject import inject_document
from meshlet.k8s.sidecar import InjectConfig

HERE = Path(__file__).parent
REPO = HERE.parents[2]
PROMETHEUS = shutil.which("prometheus")
NAMESPACE = "bookinfo"
PROM_WEB = "127.0.0.1:9090"  # in the peer namespace
SCRAPE = {"scrape_interval": "1s", "scrape_timeout": "1s"}  # the sidecar gives the app half: 0.5 s

try:
    import flask_bootstrap  # noqa: F401  productpage's own imports, from the test extra
    import json2html  # noqa: F401
    import opentelemetry.instrumentation.flask  # noqa: F401
    PRODUCTPAGE_DEPS = True
except ImportError:
    PRODUCTPAGE_DEPS = False

pytestmark = [
    *NEEDS, pytest.mark.timeout(180),
    pytest.mark.skipif(PROMETHEUS is None, reason="needs Debian's prometheus (scripts/setup installs it)"),
    pytest.mark.skipif(not PRODUCTPAGE_DEPS, reason="needs productpage's packages: pip install -e '.[test]'"),
]

POLICY = """apiVersion: meshlet.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: details, namespace: bookinfo}
spec:
  host: details
  backends: {v1: {address: "127.0.0.1:9"}}
  routes: [{name: all, to: [{backend: v1}]}]
"""


@dataclass
class Pod:
    annotations: dict[str, str]
    args: list[str]
    labels: dict[str, str]
    name: str = "productpage-v1-6b746f74dc-9stvs"


def injected(cfg: InjectConfig) -> Pod:
    """`meshlet inject` of Bookinfo's productpage Deployment: the Pod template it produces."""
    docs = list(yaml.safe_load_all((REPO / "tests/unit/k8s/manifests/productpage.yaml").read_text()))
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    template = inject_document(deployment, cfg)[0]["spec"]["template"]
    proxy = next(c for c in template["spec"]["initContainers"] if c["name"] == sidecar.PROXY_NAME)
    return Pod(template["metadata"]["annotations"], proxy["args"], template["metadata"]["labels"])


def kubelet_args(pod: Pod, work: Path) -> list[str]:
    """What the kubelet would run: $(POD_NAMESPACE) expanded from the Downward API env, the labels
    file at a path of ours; and, for want of an API server, the policy from a file."""
    (work / "labels").write_text("".join(f'{k}="{v}"\n' for k, v in pod.labels.items()))
    (work / "policy.yaml").write_text(POLICY)
    args = [a.replace("$(POD_NAMESPACE)", NAMESPACE) for a in pod.args]
    args = [str(work / "labels") if a == f"{sidecar.PODINFO_DIR}/labels" else a for a in args]
    assert args[:2] == ["run", "--watch-kube"]
    return ["run", "--policy", str(work / "policy.yaml"), *args[2:]]


def meta_labels(annotations: dict[str, str]) -> dict[str, str]:
    """What Kubernetes pod discovery derives from annotations (non-alphanumerics become `_`)."""
    return {"__meta_kubernetes_pod_annotation_" + re.sub(r"[^a-zA-Z0-9_]", "_", k): v for k, v in annotations.items()}


def start_prometheus(net: PodNet, pod: Pod, work: Path) -> None:
    jobs = yaml.safe_load((REPO / "helm/meshlet/files/scrape-configs.yaml").read_text())
    job = jobs[0]
    del job["kubernetes_sd_configs"]
    job["file_sd_configs"] = [{"files": [str(work / "targets.json")], "refresh_interval": "1s"}]
    (work / "targets.json").write_text(json.dumps([{"targets": [POD_IP], "labels": {
        **meta_labels(pod.annotations), "__meta_kubernetes_namespace": NAMESPACE,
        "__meta_kubernetes_pod_name": pod.name}}]))
    (work / "prometheus.yml").write_text(yaml.safe_dump({"global": SCRAPE, "scrape_configs": [job]}))
    net.processes.append(subprocess.Popen(
        ["ip", "netns", "exec", net.peer, PROMETHEUS, f"--config.file={work / 'prometheus.yml'}",
         f"--storage.tsdb.path={work / 'tsdb'}", f"--web.listen-address={PROM_WEB}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))


def start_sidecar(net: PodNet, args: list[str], work: Path) -> Path:
    """As root, not the sidecar's UID: with --workers the supervisor starts its workers with the
    venv's interpreter, which lives under /root on this machine, where that UID may not exec.
    No iptables redirect runs here, so the UID changes nothing else."""
    home = work / "home"
    home.mkdir()
    log = home / "sidecar.log"
    with open(log, "wb") as err:
        net.processes.append(subprocess.Popen(
            ["ip", "netns", "exec", net.pod, sys.executable, "-m", "meshlet.cli", *args],
            stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "HOME": str(home)}))
    deadline = time.monotonic() + 60
    while " ready outbound=" not in log.read_text():
        assert net.processes[-1].poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    return log


def start_productpage(net: PodNet) -> None:
    """Bookinfo's productpage on 9080; details and reviews are refused at once (nothing listens on 9)."""
    env = {**os.environ, "DETAILS_HOSTNAME": "127.0.0.1", "DETAILS_SERVICE_PORT": "9",
           "REVIEWS_HOSTNAME": "127.0.0.1", "REVIEWS_SERVICE_PORT": "9"}
    net.processes.append(subprocess.Popen(
        ["ip", "netns", "exec", net.pod, sys.executable, "productpage.py", "9080"],
        cwd=HERE / "bookinfo", env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))


PEER_GET = "import sys, urllib.request as u; print(u.urlopen(u.Request(sys.argv[1], headers={'Host': sys.argv[2]}), timeout=5).read().decode())"


def peer_get(net: PodNet, url: str, host: str = "") -> str:
    """GET from the peer namespace (where Prometheus listens and the Pod IP is reachable)."""
    result = sh("ip", "netns", "exec", net.peer, sys.executable, "-c", PEER_GET, url, host or urllib.parse.urlsplit(url).netloc,
                check=False)
    return result.stdout if result.returncode == 0 else ""


def query(net: PodNet, promql: str) -> list[dict]:
    text = peer_get(net, f"http://{PROM_WEB}/api/v1/query?query={urllib.parse.quote(promql)}")
    return json.loads(text)["data"]["result"] if text else []


def wait_for(net: PodNet, promql: str, seconds: float = 40) -> list[dict]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        result = query(net, promql)
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"Prometheus has no data for {promql} after {seconds:g}s")


@contextmanager
def bookinfo_pod(cfg: InjectConfig, app: bool) -> Iterator[tuple[PodNet, Pod, Path]]:
    with tempfile.TemporaryDirectory(prefix="merge-bookinfo-") as tmp, pod_network(prefix="mrg") as net:
        work = Path(tmp)
        os.chmod(work, 0o755)
        pod = injected(cfg)
        if app:
            start_productpage(net)
        start_sidecar(net, kubelet_args(pod, work), work)
        start_prometheus(net, pod, work)
        yield net, pod, work


def test_injected_productpage_keeps_its_metrics_in_prometheus_next_to_the_sidecars():
    with bookinfo_pod(InjectConfig(identity="none", workers=2), app=True) as (net, pod, _):
        assert pod.annotations["prometheus.io/port"] == "15020"
        assert "--app-metrics" in pod.args and pod.args[pod.args.index("--app-metrics") + 1] == \
            "http://127.0.0.1:9080/metrics"
        for _ in range(3):  # through the sidecar's inbound listener, as a peer's call would come
            assert "The Comedy of Errors" in peer_get(net, f"http://{POD_IP}:15006/productpage", "productpage:9080")

        series = wait_for(net, 'request_result_total{job="meshlet-pods",destination_app="details"} >= 3')
        assert series[0]["metric"] == {"__name__": "request_result_total", "destination_app": "details",
                                       "response_code": "500", "instance": f"{POD_IP}:15020", "job": "meshlet-pods",
                                       "namespace": NAMESPACE, "pod": pod.name}
        assert wait_for(net, 'python_info{job="meshlet-pods"}')[0]["metric"]["implementation"] == "CPython"
        assert wait_for(net, 'process_cpu_seconds_total{job="meshlet-pods"}')  # the app's, not the sidecar's

        inbound = wait_for(net, 'sum(meshlet_requests_total{direction="inbound",code="200"}) >= 3')
        assert float(inbound[0]["value"][1]) >= 3
        istio = wait_for(net, 'istio_requests_total{reporter="destination",destination_workload="productpage"}')
        assert istio[0]["metric"]["destination_workload_namespace"] == NAMESPACE
        assert istio[0]["metric"]["destination_app"] == "productpage"
        assert query(net, "meshlet_app_metrics_up")[0]["value"][1] == "1"
        targets = json.loads(peer_get(net, f"http://{PROM_WEB}/api/v1/targets"))["data"]["activeTargets"]
        assert [(t["scrapeUrl"], t["health"]) for t in targets] == [(f"http://{POD_IP}:15020/metrics", "up")]


def test_with_the_app_down_the_sidecar_is_still_scraped_and_counts_the_failures():
    with bookinfo_pod(InjectConfig(identity="none"), app=False) as (net, _, work):
        errors = wait_for(net, 'meshlet_app_metrics_scrape_errors_total{reason="connect"} >= 2')
        assert errors[0]["metric"]["pod"] == "productpage-v1-6b746f74dc-9stvs"
        assert query(net, "meshlet_app_metrics_up")[0]["value"][1] == "0"
        assert query(net, "meshlet_policy_generation")[0]["value"][1] == "1"
        assert query(net, "request_result_total") == []
        targets = json.loads(peer_get(net, f"http://{PROM_WEB}/api/v1/targets"))["data"]["activeTargets"]
        assert [t["health"] for t in targets] == ["up"]
        log = (work / "home" / "sidecar.log").read_text()
        assert log.count("app metrics http://127.0.0.1:9080/metrics: connect:") == 1  # once, not per scrape
