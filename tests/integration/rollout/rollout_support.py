"""Helpers for the rollout tests: a policy with a rollout section, the CLI, status polling,
bounded background traffic and metric reads, on top of the sidecar tests' helpers."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).parents[1] / "sidecar"))

from sidecar_support import MESHLET, Backends, Client, Sidecar, admin, free_port, get, policy, run_sidecar

__all__ = ["MESHLET", "admin", "free_port", "get", "run_sidecar"]  # re-exported for the tests

WAIT = 40.0  # seconds: the longest any rollout here may take to reach a phase


def rollout_route(steps: str = "[5, 10, 25, 50, 100]", interval: str = "1s", min_requests: int = 5,
                  failure_limit: int = 2, analysis: str = "success_rate: {min: 99}, p99: {max: 1s}") -> str:
    return (
        "    - name: canary\n      to: [{backend: v1, weight: 100}, {backend: v2, weight: 0}]\n"
        f"      rollout: {{canary: v2, stable: v1, steps: {steps}, interval: {interval}, "
        f"analysis: {{{analysis}, min_requests: {min_requests}}}, failure_limit: {failure_limit}}}\n"
    )


PLAIN_ROUTE = "    - name: canary\n      to: [{backend: v1, weight: 100}, {backend: v2, weight: 0}]\n"


@pytest.fixture(scope="module")
def backends():
    b = Backends()
    try:
        b.start("v1")
        b.start("v2")
        b.start("bad", status=500)
        yield b
    finally:
        b.close()


def reviews(backends: Backends, route: str, canary: str = "v2") -> str:
    return policy("reviews", {"v1": backends.port["v1"], "v2": backends.port[canary]}, route)


def cli(sidecar: Sidecar, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([MESHLET, "rollout", *args, "reviews", "--sidecar", sidecar.admin_url],
                          capture_output=True, text=True, timeout=30)


def status(sidecar: Sidecar) -> dict:
    code, body = admin(sidecar, "GET", "/rollouts/reviews")
    assert code == 200, body
    assert isinstance(body, dict)
    return body


def wait_for(sidecar: Sidecar, done: Callable[[dict], bool], what: str, timeout: float = WAIT) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        current = status(sidecar)
        if done(current):
            return current
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; status: {current}\n{sidecar.stderr()[-3000:]}")
        time.sleep(0.2)


@contextlib.contextmanager
def traffic(sidecar: Sidecar, path: str = "/", seconds: float = WAIT) -> Iterator[Counter]:
    """Requests on one keep-alive connection until the block ends (or `seconds`): backend → count."""
    seen: Counter = Counter()
    stop = threading.Event()

    def loop() -> None:
        client = Client(sidecar.outbound)
        deadline = time.monotonic() + seconds
        try:
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    answer = client.request(path=path)
                    seen[answer.backend or str(answer.status)] += 1
                except OSError:
                    client.close()
                    time.sleep(0.05)
        finally:
            client.close()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join(30)


def served_by(sidecar: Sidecar, n: int) -> Counter:
    client = Client(sidecar.outbound)
    try:
        return Counter(client.request().backend for _ in range(n))
    finally:
        client.close()


def metric(sidecar: Sidecar, name: str, **labels: str) -> float | None:
    _, text = admin(sidecar, "GET", "/metrics")
    assert isinstance(text, str)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None

