"""`meshlet run --prometheus URL`: a rollout judged on the sum over replicas, through a real
Prometheus (Debian's package) scraping two real sidecars every second.

Traffic goes through replica B only; replica A runs the rollout with --prometheus. A sees
none of the canary's requests itself, so it can only advance because it reads B's through
Prometheus.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml
from rollout_support import backends, cli, free_port, metric, reviews, rollout_route, run_sidecar, traffic, wait_for

PROMETHEUS = shutil.which("prometheus")
pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(PROMETHEUS is None, reason="needs Debian's prometheus (scripts/setup installs it)"),
]
__all__ = ["backends"]  # the module-scoped backends fixture, shared


@pytest.fixture
def prometheus(tmp_path):
    """(url, targets file): file discovery so targets can be added once the sidecars run."""
    targets = tmp_path / "targets.yml"
    targets.write_text("[]\n")
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [{"job_name": "meshlet", "file_sd_configs": [{"files": [str(targets)],
                                                                        "refresh_interval": "1s"}]}],
    }))
    web = f"127.0.0.1:{free_port()}"
    process = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address={web}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield f"http://{web}", targets
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def test_rollout_reads_every_replica_through_prometheus(backends, prometheus):
    url, targets = prometheus
    text = reviews(backends, rollout_route(steps="[50, 100]", interval="3s", min_requests=5))
    with run_sidecar(text, "--prometheus", url) as a, run_sidecar(text) as b:
        targets.write_text(yaml.safe_dump([{"targets": [f"{a.admin[0]}:{a.admin[1]}", f"{b.admin[0]}:{b.admin[1]}"]}]))
        assert cli(b, "start").returncode == 0  # B's table sends half the traffic to the canary
        assert cli(a, "start").returncode == 0
        with traffic(b):
            final = wait_for(a, lambda s: s["phase"] != "Progressing", "replica A's rollout to finish", timeout=60)
        assert (final["phase"], final["weight"]) == ("Succeeded", 100)
        assert final["last"]["requests"] >= 5
        assert metric(a, "meshlet_requests_total", backend="v2") is None  # A itself served no canary request
