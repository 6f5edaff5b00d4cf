"""A real Prometheus (Debian's package) for the telemetry tests: started on a free port with a
1 s scrape interval, targets through file discovery, queried over its HTTP API.

`scrape_pods` uses the chart's own scrape job (helm/meshlet/files/scrape-configs.yaml) with
Kubernetes pod discovery swapped for file discovery carrying the same `__meta_kubernetes_*`
labels, so series get the `namespace` and `pod` labels a cluster's Prometheus gives them.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).parents[3]
PROMETHEUS = shutil.which("prometheus")
SCRAPE_INTERVAL = 1.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pod_target(address: str, namespace: str, pod: str, port: int) -> dict:
    """A file_sd entry for a Pod annotated as injection annotates it (scrape, port, path)."""
    annotations = {"prometheus.io/scrape": "true", "prometheus.io/port": str(port), "prometheus.io/path": "/metrics"}
    labels = {"__meta_kubernetes_pod_annotation_" + re.sub(r"[^a-zA-Z0-9_]", "_", k): v for k, v in annotations.items()}
    return {"targets": [address], "labels": {**labels, "__meta_kubernetes_namespace": namespace,
                                             "__meta_kubernetes_pod_name": pod}}


def chart_scrape_job(targets_file: Path) -> dict:
    jobs = yaml.safe_load((REPO / "helm" / "meshlet" / "files" / "scrape-configs.yaml").read_text())
    job = dict(jobs[0])
    assert job.pop("kubernetes_sd_configs") == [{"role": "pod"}]
    job["file_sd_configs"] = [{"files": [str(targets_file)], "refresh_interval": "1s"}]
    return job


class PrometheusError(RuntimeError):
    """The API answered an error (a bad query names its position), or Prometheus is not up."""


class Prometheus:
    """One Prometheus process; `prefix` runs it elsewhere (e.g. `nsenter --net=...`). Call `stop`."""

    def __init__(self, workdir: Path, jobs: Sequence[dict], prefix: Sequence[str] = ()) -> None:
        assert PROMETHEUS is not None
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": f"{SCRAPE_INTERVAL:g}s", "scrape_timeout": "1s"},
            "scrape_configs": list(jobs),
        }))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.process = subprocess.Popen(
            [*prefix, PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address={self.url.removeprefix('http://')}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PrometheusError(f"prometheus exited {self.process.returncode}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise PrometheusError(f"prometheus not ready within {timeout:g}s")

    def api(self, path: str, params: Mapping[str, str | Sequence[str]]) -> Any:
        """GET /api/v1/PATH; the `data` of a success, else PrometheusError with Prometheus' own message."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params, doseq=True)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as e:
            body = json.loads(e.read() or b"{}")
        if body.get("status") != "success":
            raise PrometheusError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def instant(self, query: str, at: float | None = None) -> list[dict]:
        params = {"query": query} | ({"time": f"{at:.3f}"} if at is not None else {})
        return self.api("query", params)["result"]

    def wait_for(self, query: str, ok: Callable[[list[dict]], bool], what: str, timeout: float = 20.0) -> list[dict]:
        """Poll `query` until `ok(result)`; the result, or an AssertionError saying what was awaited."""
        deadline = time.monotonic() + timeout
        result: list[dict] = []
        while time.monotonic() < deadline:
            result = self.instant(query)
            if ok(result):
                return result
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout:g}s waiting for {what}; {query} = {result}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
