"""A real Prometheus scrapes a running sidecar the way the chart tells it to, and answers p99.

No cluster runs here, so Kubernetes pod discovery is replaced by file discovery carrying the
same `__meta_kubernetes_pod_annotation_*` labels, taken from an injected Pod's annotations.
Everything else is real: the chart's relabelling rules, Prometheus (Debian's package),
`meshlet run` with live traffic through its outbound listener, and a PromQL query.
"""

from __future__ import annotations

import json
import math
import queue
import re
import shutil
import socket
import subprocess
import sys
import threading
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from meshlet.k8s.inject import inject_pod
from meshlet.k8s.sidecar import InjectConfig

REPO = Path(__file__).parents[3]
MESHLET = Path(sys.executable).parent / "meshlet"
PROMETHEUS = shutil.which("prometheus")
QUERY = 'histogram_quantile(0.99, sum by (le) (rate(meshlet_request_duration_seconds_bucket{job="meshlet-pods"}[5s])))'

pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="needs Debian's prometheus (scripts/setup installs it)")


class Backend(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"v1")

    def log_message(self, format: str, *args: object) -> None:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def meta_labels(annotations: dict[str, str]) -> dict[str, str]:
    """What Kubernetes pod discovery derives from annotations (non-alphanumerics become `_`)."""
    return {"__meta_kubernetes_pod_annotation_" + re.sub(r"[^a-zA-Z0-9_]", "_", k): v for k, v in annotations.items()}


def prometheus_config(targets_file: Path) -> dict:
    jobs = yaml.safe_load((REPO / "helm" / "meshlet" / "files" / "scrape-configs.yaml").read_text())
    job = jobs[0]
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
    del job["kubernetes_sd_configs"]
    job["file_sd_configs"] = [{"files": [str(targets_file)], "refresh_interval": "1s"}]
    return {"global": {"scrape_interval": "1s", "scrape_timeout": "1s"}, "scrape_configs": [job]}


@pytest.fixture
def processes():
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        proc.terminate()
    for proc in started:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def start_sidecar(tmp_path: Path, backend_port: int, processes: list) -> dict[str, str]:
    policy = tmp_path / "policy.yaml"
    policy.write_text((REPO / "policies" / "canary.yaml").read_text()
                      .replace("127.0.0.1:9081", f"127.0.0.1:{backend_port}")
                      .replace("127.0.0.1:9082", f"127.0.0.1:{backend_port}"))
    proc = subprocess.Popen([str(MESHLET), "run", "--policy", str(policy), "--outbound", "127.0.0.1:0",
                             "--inbound", "127.0.0.2:0", "--admin", "127.0.0.1:0", "--health", "127.0.0.1:0",
                             "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    processes.append(proc)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    for _ in range(50):
        line = lines.get(timeout=30)
        if " ready " in line:
            return dict(re.findall(r"(\w+)=(\S+)", line))
    raise AssertionError("sidecar never logged ready")


def test_prometheus_scrapes_an_injected_sidecar_and_answers_p99(tmp_path, processes):
    backend = ThreadingHTTPServer(("127.0.0.1", 0), Backend)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    stop = threading.Event()
    try:
        addrs = start_sidecar(tmp_path, backend.server_address[1], processes)
        health_port = int(addrs["health"].rsplit(":", 1)[1])

        # The Pod as injected with this sidecar's health port, and a Pod that opted out of scraping.
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "reviews-v1-abc"},
               "spec": {"containers": [{"name": "app", "image": "app"}]}}
        annotations = inject_pod(pod, InjectConfig(health_port=health_port)).obj["metadata"]["annotations"]
        targets = tmp_path / "targets.json"
        targets.write_text(json.dumps([
            {"targets": ["127.0.0.1"], "labels": {**meta_labels(annotations), "__meta_kubernetes_namespace": "shop",
                                                   "__meta_kubernetes_pod_name": "reviews-v1-abc"}},
            {"targets": ["127.0.0.1:1"], "labels": meta_labels({"prometheus.io/scrape": "false"})},
        ]))
        config = tmp_path / "prometheus.yml"
        config.write_text(yaml.safe_dump(prometheus_config(targets)))
        web = f"127.0.0.1:{free_port()}"
        processes.append(subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address={web}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

        def traffic() -> None:
            for _ in range(3000):  # bounded: ~60 s at most
                if stop.wait(0.02):
                    return
                try:
                    conn = socket.create_connection(("127.0.0.1", int(addrs["outbound"].rsplit(":", 1)[1])), 5)
                    conn.sendall(b"GET / HTTP/1.1\r\nHost: reviews\r\nConnection: close\r\n\r\n")
                    while conn.recv(4096):
                        pass
                    conn.close()
                except OSError:
                    pass

        threading.Thread(target=traffic, daemon=True).start()

        value = None
        for _ in range(60):
            stop.wait(1)
            try:
                result = get_json(f"http://{web}/api/v1/query?query={urllib.parse.quote(QUERY)}")["data"]["result"]
            except OSError:
                continue  # Prometheus still starting
            if result and math.isfinite(float(result[0]["value"][1])):
                value = float(result[0]["value"][1])
                break
        assert value is not None, "no finite p99 from Prometheus within 60 s"
        assert 0 < value < 10, value  # seconds, within the histogram's buckets

        active = get_json(f"http://{web}/api/v1/targets")["data"]["activeTargets"]
        assert [t["scrapeUrl"] for t in active] == [f"http://127.0.0.1:{health_port}/metrics"]
        assert active[0]["labels"]["pod"] == "reviews-v1-abc" and active[0]["labels"]["namespace"] == "shop"
        assert active[0]["health"] == "up"
    finally:
        stop.set()
        backend.shutdown()
        backend.server_close()
