"""gRPC through the lean engine's outbound listener, with real grpcio clients and servers.

A grpcio insecure channel speaks prior-knowledge HTTP/2 (h2c) and keeps one connection: every
call is a stream, and the sidecar routes each stream by itself. (The mitmproxy engine relays
h2c at L4 without policy: tests/integration/k8s covers that.)
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import grpc
import pytest
from grpc_support import Stub, channel_to, start_grpc_backend
from prometheus_client.parser import text_string_to_metric_families
from sidecar_support import admin, run_sidecar

pytestmark = [pytest.mark.engines("lean"), pytest.mark.timeout(120)]

SPLIT = """\
    - name: beta
      match: {headers: {x-group: beta}}
      to: [{backend: v2}]
    - name: sticky
      match: {headers: {x-sticky: "yes"}}
      to: [{backend: v1, weight: 50}, {backend: v2, weight: 50}]
      sticky: {header: x-user-id}
    - name: slow
      match: {path: {prefix: /demo.Svc/Echo}, headers: {x-slow: "yes"}}
      to: [{backend: v1}]
      timeout: 300ms
    - name: gone
      match: {headers: {x-gone: "yes"}}
      to: [{backend: gone}]
    - name: retried
      match: {headers: {x-retry: "yes"}}
      to: [{backend: down, weight: 100}, {backend: v1, weight: 0}]
      retries: {attempts: 1, retryOn: [unavailable]}
    - name: canary
      to: [{backend: v1, weight: 70}, {backend: v2, weight: 30}]
"""


@pytest.fixture(scope="module")
def grpc_backends():
    started = {name: start_grpc_backend(name) for name in ("v1", "v2", "down")}
    yield {name: port for name, (_, port) in started.items()}
    for server, _ in started.values():
        server.stop(0)


def grpc_policy(ports: dict[str, int], routes: str = SPLIT) -> str:
    lines = [f'    {name}: {{address: "127.0.0.1:{port}"}}' for name, port in ports.items()]
    lines.append('    gone: {address: "127.0.0.1:9"}')
    return (
        "apiVersion: meshlet.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: svc, namespace: default}\n"
        "spec:\n  host: svc\n  backends:\n" + "\n".join(lines) + "\n  routes:\n" + routes
    )


@pytest.fixture(scope="module")
def sidecar(grpc_backends, engine):
    with run_sidecar(grpc_policy(grpc_backends)) as sidecar:
        yield sidecar
        assert "Traceback" not in sidecar.stderr()


@pytest.fixture
def stub(sidecar):
    channel = channel_to(sidecar.outbound, "svc")
    yield Stub(channel)
    channel.close()


def backend_of(answer: bytes) -> str:
    return answer.split(b":")[0].decode()


def test_one_channel_is_split_70_30_call_by_call(stub):
    seen = Counter(backend_of(stub.echo(b"hi", timeout=10)) for _ in range(600))
    assert sum(seen.values()) == 600
    assert 0.63 < seen["v1"] / 600 < 0.77, seen  # 70% ± 7 (about 4 standard deviations)


def test_metadata_matches_route_each_call(stub):
    assert {backend_of(stub.echo(b"x", metadata=(("x-group", "beta"),), timeout=10)) for _ in range(30)} == {"v2"}


def test_sticky_by_metadata_keeps_a_user_on_one_backend(stub):
    for user in ("ana", "bo", "cy", "di"):
        seen = {backend_of(stub.echo(b"x", metadata=(("x-sticky", "yes"), ("x-user-id", user)), timeout=10))
                for _ in range(15)}
        assert len(seen) == 1, (user, seen)


def test_all_four_call_shapes_carry_messages_and_trailers(stub):
    assert [m.split(b"-")[1] for m in stub.count(b"50", timeout=10)] == [b"%d" % i for i in range(50)]
    assert stub.sum(iter([b"ab", b"cde", b"f" * 1000]), timeout=10).endswith(b":1005")
    replies = list(stub.chat(iter([b"one", b"two", b"three"]), timeout=10))
    assert [r.split(b">")[1] for r in replies] == [b"one", b"two", b"three"]
    assert len({r.split(b">")[0] for r in replies}) == 1  # one call, one backend


def test_backend_status_and_message_reach_the_client(stub):
    with pytest.raises(grpc.RpcError) as failed:
        stub.echo(b"fail", metadata=(("x-group", "beta"),), timeout=10)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert failed.value.details() == "v2 asked to fail"


def test_route_timeout_answers_deadline_exceeded_from_the_sidecar(stub):
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as failed:
        stub.echo(b"sleep2", metadata=(("x-slow", "yes"),), timeout=10)
    assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "meshlet: route 'slow' timed out after 0.3s" in failed.value.details()
    assert time.monotonic() - started < 1.5  # the route's 300 ms, not the client's 10 s


def test_unreachable_backend_answers_unavailable(stub):
    with pytest.raises(grpc.RpcError) as failed:
        stub.echo(b"x", metadata=(("x-gone", "yes"),), timeout=10)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "meshlet: backend 'gone' unavailable" in failed.value.details()


def test_unavailable_is_retried_on_the_next_backend(sidecar, stub):
    """gRPC errors come as HTTP 200 with grpc-status: `retryOn: [unavailable]` reads the trailers."""
    before = grpc_counts(sidecar)
    assert {backend_of(stub.echo(b"x", metadata=(("x-retry", "yes"),), timeout=10)) for _ in range(10)} == {"v1"}
    assert grpc_counts(sidecar)[("retried", "v1", "0")] - before[("retried", "v1", "0")] == 10


def grpc_counts(sidecar) -> Counter:
    _, text = admin(sidecar, "GET", "/metrics")
    counts: Counter = Counter()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "meshlet_requests_total":
                counts[(s.labels["route"], s.labels["backend"], s.labels["grpc_status"])] += s.value
    return counts


def test_grpc_status_is_counted_per_call(sidecar, stub):
    before = grpc_counts(sidecar)
    stub.echo(b"ok", metadata=(("x-group", "beta"),), timeout=10)
    for _ in range(2):
        with pytest.raises(grpc.RpcError):
            stub.echo(b"fail", metadata=(("x-group", "beta"),), timeout=10)
    after = grpc_counts(sidecar)
    assert after[("beta", "v2", "0")] - before[("beta", "v2", "0")] == 1
    assert after[("beta", "v2", "14")] - before[("beta", "v2", "14")] == 2


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_a_100_mb_stream_to_a_slow_reader_keeps_the_sidecar_small(sidecar, stub):
    """Flow control carries the reader's pace back to the backend: the sidecar holds a window, not
    the stream (HTTP/2 windows of 1 MiB a stream, acknowledged only once the client took the data)."""
    baseline = rss_kib(sidecar.process.pid)
    peak = baseline
    received = 0
    for i, message in enumerate(stub.count(b"big:1600:65536", metadata=(("x-group", "beta"),), timeout=100)):
        received += len(message)
        if i % 100 == 0:
            peak = max(peak, rss_kib(sidecar.process.pid))
            time.sleep(0.05)  # a slow reader
    assert received == 1600 * 65536
    assert peak - baseline < 32 * 1024, f"sidecar RSS grew by {(peak - baseline) // 1024} MiB"


def test_sigterm_lets_calls_in_flight_finish(grpc_backends):
    with run_sidecar(grpc_policy(grpc_backends)) as sidecar:
        channel = channel_to(sidecar.outbound, "svc")
        stub = Stub(channel)
        assert backend_of(stub.echo(b"warm", timeout=10)) in {"v1", "v2"}
        outcome: list = []
        slow = threading.Thread(target=lambda: outcome.append(stub.echo(b"sleep1.5", timeout=20)))
        slow.start()
        time.sleep(0.5)  # the call is now with the backend
        sidecar.process.terminate()
        slow.join(30)
        assert len(outcome) == 1 and outcome[0].split(b":")[1] == b"sleep1.5"
        assert sidecar.process.wait(20) == 0
        channel.close()
        assert "Traceback" not in sidecar.stderr()
