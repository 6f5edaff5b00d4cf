"""A cluster's identity plumbing on loopback: a fake Kubernetes API server for TokenReviews, a
mesh CA dir, `meshlet identity serve` as a real process, and token files as the kubelet projects them.

The fake API server stands in for kube-apiserver (which cannot run here): it is the only part
that is not real. The identity service talks to it with the official `kubernetes` client over
HTTP on loopback, as it would to a cluster.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "k8s"))
sys.path.insert(0, str(Path(__file__).parents[1] / "mtls"))

from fake_apiserver import FakeApiServer, kubeconfig
from mesh_support import MESHLET, now
from prometheus_client.parser import text_string_to_metric_families
from sidecar_support import free_port

from meshlet.mtls.ca import new_authority
from meshlet.mtls.files import write_authority

__all__ = ["FakeApiServer", "IdentityServer", "identity_server", "kubeconfig", "make_ca", "token_file"]

SERVING = re.compile(r"identity: serving (https://\S+)")
START_TIMEOUT = 30.0


def make_ca(directory: Path) -> Path:
    write_authority(directory, new_authority(now()))
    return directory


def token_file(directory: Path, api: FakeApiServer, namespace: str, name: str,
               audiences: tuple[str, ...] = ("meshlet",)) -> Path:
    """A projected ServiceAccount token, as the kubelet writes it into a Pod."""
    token = api.service_account_token(namespace, name, audiences)
    path = directory / f"token-{namespace}-{name}-{token[-8:]}"
    path.write_text(token)
    return path


@dataclass
class IdentityServer:
    process: subprocess.Popen
    url: str
    metrics_port: int
    log: Path

    def stderr(self) -> str:
        return self.log.read_text()

    def metric(self, name: str, **labels: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            text = response.read().decode()
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


@contextlib.contextmanager
def identity_server(ca_dir: Path, config: str, *extra: str, ttl: str = "1h",
                    port: int | None = None) -> Iterator[IdentityServer]:
    """`meshlet identity serve` on loopback, TokenReviews against the kubeconfig `config`."""
    workdir = Path(tempfile.mkdtemp(prefix="identity-server-"))
    log = workdir / "stderr.log"
    metrics_port = free_port()
    args = [MESHLET, "identity", "serve", "--ca", str(ca_dir), "--listen", f"127.0.0.1:{port or free_port()}",
            "--ttl", ttl, "--metrics", f"127.0.0.1:{metrics_port}", *extra]
    with open(log, "wb") as err:
        process = subprocess.Popen(args, stderr=err, env={**os.environ, "KUBECONFIG": config, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not (match := SERVING.search(log.read_text())):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"identity server did not start (exit {process.poll()}):\n{log.read_text()}")
            time.sleep(0.05)
        yield IdentityServer(process, match[1], metrics_port, log)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        with contextlib.suppress(OSError):
            for path in workdir.iterdir():
                path.unlink()
            workdir.rmdir()
