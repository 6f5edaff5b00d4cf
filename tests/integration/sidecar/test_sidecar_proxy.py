"""The sidecar end to end: real `meshlet run`, real mitmproxy, real backends on loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from sidecar_support import (
    MESHLET,
    Answer,
    Backends,
    Client,
    admin,
    free_port,
    get,
    load,
    policy,
    run_sidecar,
)

pytestmark = pytest.mark.timeout(120)

CANARY = "    - name: canary\n      to: [{backend: v1, weight: 90}, {backend: v2, weight: 10}]\n"
HALF = "    - name: canary\n      to: [{backend: v1, weight: 50}, {backend: v2, weight: 50}]\n"


@pytest.fixture(scope="module")
def backends():
    b = Backends()
    try:
        b.start("v1")
        b.start("v2")
        b.start("flaky", status=500)
        b.port["dead"] = free_port()  # nothing listens there
        yield b
    finally:
        b.close()


def shared_policy(port: dict[str, int]) -> str:
    v12 = {"v1": port["v1"], "v2": port["v2"]}
    docs = [
        policy("reviews", v12, CANARY),
        policy("counted", v12, "    - name: count\n      to: [{backend: v1, weight: 70}, {backend: v2, weight: 30}]\n"),
        policy("ab", v12, (
            "    - name: beta-header\n      match: {headers: {x-group: beta}}\n      to: [{backend: v2}]\n"
            "    - name: beta-cookie\n      match: {cookies: {ab: B}}\n      to: [{backend: v2}]\n"
            "    - name: default\n      to: [{backend: v1}]\n"
        )),
        policy("sticky", v12, (
            "    - name: sticky\n      to: [{backend: v1, weight: 50}, {backend: v2, weight: 50}]\n"
            "      sticky: {header: x-user-id}\n"
        )),
        policy("slow", v12, "    - name: slow\n      to: [{backend: v1}]\n      timeout: 300ms\n"),
        policy("dead", {"dead": port["dead"]}, "    - name: dead\n      to: [{backend: dead}]\n"),
        policy("dead-timed", {"dead": port["dead"]}, "    - name: dead\n      to: [{backend: dead}]\n      timeout: 2s\n"),
        policy("retry", {"dead": port["dead"], "v2": port["v2"]}, (
            "    - name: retry\n      to: [{backend: dead, weight: 99}, {backend: v2, weight: 1}]\n"
            "      retries: {attempts: 1, retryOn: [connect-failure]}\n"
        )),
        policy("retry-timed", {"dead": port["dead"], "v2": port["v2"]}, (
            "    - name: retry\n      to: [{backend: dead, weight: 99}, {backend: v2, weight: 1}]\n"
            "      timeout: 5s\n      retries: {attempts: 1, retryOn: [connect-failure]}\n"
        )),
        policy("flaky", {"flaky": port["flaky"], "v1": port["v1"]}, (
            "    - name: flaky\n      to: [{backend: flaky, weight: 99}, {backend: v1, weight: 1}]\n"
            "      retries: {attempts: 1, retryOn: [5xx]}\n"
        )),
    ]
    return "---\n".join(docs)


@pytest.fixture(scope="module")
def sidecar(backends, engine):
    with run_sidecar(shared_policy(backends.port), app_port=backends.port["v1"], workers=2) as s:
        yield s


def shares(answers: list[Answer | Exception]) -> Counter:
    return Counter(a.backend if isinstance(a, Answer) and a.status == 200 else repr(a) for a in answers)


def test_canary_90_10_split_over_2000_requests(sidecar):
    counts = shares(load(sidecar.outbound, 2000, host="reviews"))
    assert set(counts) == {"v1", "v2"}, counts
    assert abs(counts["v2"] / 2000 * 100 - 10) <= 3, counts


def test_explicit_proxy_absolute_form_is_routed(sidecar):
    """As with HTTP_PROXY=http://127.0.0.1:15001: the request line carries the full URL."""
    client = Client(sidecar.outbound)
    try:
        answers = [client.request(path="http://ab/x", host="ab", headers={"x-group": "beta"}) for _ in range(5)]
        answers += [client.request(path="http://ab/x", host="ab") for _ in range(5)]
        assert [(a.status, a.backend) for a in answers] == [(200, "v2")] * 5 + [(200, "v1")] * 5
    finally:
        client.close()


def test_header_and_cookie_ab(sidecar):
    client = Client(sidecar.outbound)
    try:
        assert client.request(host="ab", headers={"x-group": "beta"}).backend == "v2"
        assert client.request(host="ab", headers={"Cookie": "theme=dark; ab=B"}).backend == "v2"
        assert client.request(host="ab", headers={"Cookie": "ab=A"}).backend == "v1"
        assert {client.request(host="ab").backend for _ in range(20)} == {"v1"}
    finally:
        client.close()


def test_sticky_header_keeps_backend(sidecar):
    client = Client(sidecar.outbound)
    try:
        first = {user: client.request(host="sticky", headers={"x-user-id": user}).backend for user in map(str, range(40))}
        assert set(first.values()) == {"v1", "v2"}  # 40 users on 50/50: both versions used
        for _ in range(3):
            for user, backend in first.items():
                assert client.request(host="sticky", headers={"x-user-id": user}).backend == backend
    finally:
        client.close()


def test_route_timeout_gives_504_and_fast_requests_pass(sidecar):
    answer = get(sidecar.outbound, "/sleep/3", host="slow")
    assert answer.status == 504
    assert "route 'slow' timed out after 0.3s" in answer.body
    assert get(sidecar.outbound, "/", host="slow") == Answer(200, "v1\n", "v1")


@pytest.mark.parametrize("host", ["dead", "dead-timed"])
def test_refused_backend_gives_503_with_reason(sidecar, host):
    answer = get(sidecar.outbound, host=host)
    assert answer.status == 503
    assert "backend 'dead' unavailable" in answer.body and "cannot connect" in answer.body


@pytest.mark.parametrize("host", ["retry", "retry-timed"])
def test_retry_on_connect_failure_reaches_healthy_backend(sidecar, host):
    answers = [get(sidecar.outbound, host=host) for _ in range(10)]
    assert [(a.status, a.backend) for a in answers] == [(200, "v2")] * 10


def test_retry_on_5xx_only_for_idempotent_methods(sidecar):
    client = Client(sidecar.outbound)
    try:
        assert [client.request(host="flaky").status for _ in range(10)] == [200] * 10
        posts = [client.request("POST", host="flaky", body=b"x").status for _ in range(10)]
        assert 500 in posts  # 99% land on the failing backend and a POST is never sent twice
    finally:
        client.close()


def test_unknown_host_passes_through_to_its_destination(sidecar, backends):
    answer = get(sidecar.outbound, host=f"127.0.0.1:{backends.port['v2']}")
    assert (answer.status, answer.backend) == (200, "v2")


def test_inbound_forwards_to_app(sidecar):
    assert get(sidecar.inbound, host="whatever") == Answer(200, "v1\n", "v1")


@pytest.mark.engines("mitmproxy")  # the lean engine serves h2c (tests/integration/sidecar/test_grpc.py)
def test_cleartext_h2_prior_knowledge_gets_goaway_with_reason(sidecar):
    with socket.create_connection(sidecar.outbound, timeout=10) as conn:
        conn.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        data = b""
        while chunk := conn.recv(4096):
            data += chunk
    assert data[3] == 0x4  # SETTINGS first, as an HTTP/2 server must
    goaway = data[9:]
    assert goaway[3] == 0x7 and int.from_bytes(goaway[13:17], "big") == 0xD  # GOAWAY HTTP_1_1_REQUIRED
    assert b"cleartext HTTP/2 (h2c) is not supported" in goaway


def test_invalid_put_gives_400_with_every_error_and_keeps_old_table(sidecar, backends):
    status, before = admin(sidecar, "GET", "/policy")
    assert status == 200
    bad = policy("reviews", {"v1": backends.port["v1"]}, (
        "    - name: canary\n      to: [{backend: v1, weight: 100}]\n"
        "      timeout: soon\n      retries: {attempts: 1, retryOn: [bogus]}\n"
    ))
    status, answer = admin(sidecar, "PUT", "/policy", bad.encode())
    assert status == 400
    assert len(answer["errors"]) >= 2, answer
    assert all(e.startswith("policy:") and e.split(":")[1].isdigit() for e in answer["errors"]), answer
    status, after = admin(sidecar, "GET", "/policy")
    assert after == before
    assert shares(load(sidecar.outbound, 200, host="reviews")).keys() <= {"v1", "v2"}
    assert get(sidecar.outbound, host="ab", headers={"x-group": "beta"}).backend == "v2"  # other hosts kept too


def test_admin_health_and_readiness(sidecar):
    assert admin(sidecar, "GET", "/healthz") == (200, "ok\n")
    assert admin(sidecar, "GET", "/readyz") == (200, "ready\n")
    assert admin(sidecar, "GET", "/nope")[0] == 404
    assert admin(sidecar, "DELETE", "/policy")[0] == 405


def metric_samples(sidecar, name: str) -> list:
    status, text = admin(sidecar, "GET", "/metrics")
    assert status == 200, text
    return [s for family in text_string_to_metric_families(text) for s in family.samples if s.name == name]


def test_metrics_count_the_requests_sent(sidecar):
    answers = load(sidecar.outbound, 300, host="counted")
    seen = shares(answers)
    assert sum(seen.values()) == 300 and set(seen) <= {"v1", "v2"}
    totals = {
        s.labels["backend"]: s.value for s in metric_samples(sidecar, "meshlet_requests_total")
        if s.labels["route"] == "count" and s.labels["code"] == "200" and s.labels["direction"] == "outbound"
    }
    assert totals == {backend: float(n) for backend, n in seen.items()}
    counts = [s for s in metric_samples(sidecar, "meshlet_request_duration_seconds_count") if s.labels["route"] == "count"]
    assert sum(s.value for s in counts) == 300
    assert [s.value for s in metric_samples(sidecar, "meshlet_policy_generation")] == [1.0]


def test_twenty_applies_during_3000_requests_lose_nothing(backends):
    v12 = {"v1": backends.port["v1"], "v2": backends.port["v2"]}
    policies = [policy("reviews", v12, CANARY), policy("reviews", v12, HALF)]
    with run_sidecar(policies[0], workers=2) as sidecar:
        results: list = []
        loader = threading.Thread(target=lambda: results.extend(load(sidecar.outbound, 3000, host="reviews")))
        loader.start()
        generations = []
        for i in range(20):
            status, answer = admin(sidecar, "PUT", "/policy", policies[(i + 1) % 2].encode())
            assert status == 200, answer
            generations.append(answer["generation"])
            time.sleep(0.05)
        loader.join(100)
        assert not loader.is_alive()
        assert generations == list(range(2, 22))
        failed = [r for r in results if not (isinstance(r, Answer) and r.status == 200)]
        assert len(results) == 3000 and failed == []
        applies = {s.labels["result"]: s.value for s in metric_samples(sidecar, "meshlet_policy_applies_total")}
        assert applies == {"ok": 20.0}
        assert sidecar.stop() == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_drains_an_in_flight_slow_request(backends, workers):
    v12 = {"v1": backends.port["v1"], "v2": backends.port["v2"]}
    with run_sidecar(policy("reviews", v12, CANARY), workers=workers) as sidecar:
        assert get(sidecar.outbound, "/", host="reviews").status == 200
        outcome: list = []
        slow = threading.Thread(target=lambda: outcome.append(get(sidecar.outbound, "/sleep/1.5", host="reviews")))
        slow.start()
        deadline = time.monotonic() + 10
        while not any(s.labels["route"] == "canary" for s in metric_samples(sidecar, "meshlet_requests_total")):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.3)  # the slow request is now with the backend
        sidecar.process.terminate()
        deadline = time.monotonic() + 10
        while sidecar.stderr().count("request(s) in flight (up to") < workers:  # every worker closed its listener
            assert time.monotonic() < deadline, sidecar.stderr()
            time.sleep(0.05)
        with pytest.raises(OSError):
            socket.create_connection(sidecar.outbound, timeout=5).close()
        slow.join(30)
        assert len(outcome) == 1 and outcome[0].status == 200 and outcome[0].backend in {"v1", "v2"}
        assert sidecar.process.wait(20) == 0
        assert "Traceback" not in sidecar.stderr()


def test_drain_is_bounded_by_drain_timeout(backends):
    v12 = {"v1": backends.port["v1"], "v2": backends.port["v2"]}
    with run_sidecar(policy("reviews", v12, CANARY), "--drain-timeout", "0.5") as sidecar:
        outcome: list = []
        slow = threading.Thread(target=lambda: outcome.append(load(sidecar.outbound, 1, 1, path="/sleep/20")[0]))
        slow.start()
        time.sleep(0.5)
        sidecar.process.terminate()
        assert sidecar.process.wait(15) == 0
        assert "drain timeout: 1 request(s) still in flight" in sidecar.stderr()
        slow.join(30)
        assert len(outcome) == 1 and isinstance(outcome[0], Exception)  # cut off, not answered


def test_apply_shows_diff_then_applies(backends):
    v12 = {"v1": backends.port["v1"], "v2": backends.port["v2"]}
    with run_sidecar(policy("reviews", v12, CANARY)) as sidecar, \
            open(sidecar.log.parent / "half.yaml", "w") as f:
        f.write(policy("reviews", v12, HALF))
        f.close()
        dry = subprocess.run([MESHLET, "apply", f.name, "--sidecar", sidecar.admin_url, "--dry-run"],
                             capture_output=True, text=True, timeout=30)
        assert dry.returncode == 0, dry.stderr
        assert "~ route canary: v1 90→50, v2 10→50" in dry.stdout and "nothing applied" in dry.stdout
        assert admin(sidecar, "GET", "/policy")[1]["generation"] == 1
        real = subprocess.run([MESHLET, "apply", f.name, "--sidecar", sidecar.admin_url],
                              capture_output=True, text=True, timeout=30)
        assert real.returncode == 0, real.stderr
        assert "applied: generation 2" in real.stdout
        assert admin(sidecar, "GET", "/policy")[1]["generation"] == 2
        as_json = json.dumps(yaml.safe_load(policy("reviews", v12, CANARY)))
        assert admin(sidecar, "PUT", "/policy", as_json.encode()) == (200, {"generation": 3})
        assert get(sidecar.outbound, host="reviews").status == 200


DEPRECATED_ON = CANARY + "      retries: {attempts: 1, on: [5xx]}\n"  # line 12 of policy(); `on` at column 30
WARNING = ":12:30: warning: TrafficPolicy 'reviews' spec.routes[0].retries: 'on' is deprecated, write 'retryOn': "


def test_deprecated_retry_on_warns_in_run_apply_and_put_and_still_applies(backends):
    v12 = {"v1": backends.port["v1"], "v2": backends.port["v2"]}
    text = policy("reviews", v12, DEPRECATED_ON)
    with run_sidecar(text) as sidecar:
        assert f"policy.yaml{WARNING}YAML 1.1 readers such as kubectl's" in sidecar.stderr()
        path = sidecar.log.parent / "deprecated.yaml"
        path.write_text(text.replace("weight: 90", "weight: 50").replace("weight: 10", "weight: 50"))
        applied = subprocess.run([MESHLET, "apply", str(path), "--sidecar", sidecar.admin_url],
                                 capture_output=True, text=True, timeout=30)
        assert applied.returncode == 0, applied.stderr
        assert applied.stderr.splitlines() == [f"{path}{WARNING}YAML 1.1 readers such as kubectl's read a bare "
                                               "`on:` key as the boolean true"]
        assert "applied: generation 2" in applied.stdout
        status, answer = admin(sidecar, "PUT", "/policy", text.encode())
        assert (status, answer["generation"]) == (200, 3)
        assert [w.split(": warning: ")[0] for w in answer["warnings"]] == ["policy:12:30"]
        assert admin(sidecar, "PUT", "/policy", text.replace(" on:", " retryOn:").encode()) == (200, {"generation": 4})


def test_apply_to_unreachable_sidecar_is_one_line_exit_1(tmp_path, backends):
    path = tmp_path / "p.yaml"
    path.write_text(policy("reviews", {"v1": backends.port["v1"]}, "    - name: all\n      to: [{backend: v1}]\n"))
    result = subprocess.run([MESHLET, "apply", str(path), "--sidecar", f"http://127.0.0.1:{free_port()}"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.startswith("meshlet: sidecar unreachable at http://127.0.0.1:")
    assert result.stderr.count("\n") == 1


def test_run_rejects_invalid_policy_with_location(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("apiVersion: meshlet.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: x}\nspec: {host: x}\n")
    result = subprocess.run([MESHLET, "run", "--policy", str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert f"{path}:4:" in result.stderr and "Traceback" not in result.stderr


def test_run_reports_a_busy_port_in_one_line(tmp_path, backends):
    path = tmp_path / "p.yaml"
    path.write_text(policy("reviews", {"v1": backends.port["v1"]}, "    - name: all\n      to: [{backend: v1}]\n"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [MESHLET, "run", "--policy", str(path), "--outbound", f"127.0.0.1:{port}",
             "--inbound", f"127.0.0.1:{free_port()}", "--admin", f"127.0.0.1:{free_port()}"],
            capture_output=True, text=True, timeout=30,
        )
    assert result.returncode == 1
    assert "meshlet:" in result.stderr and str(port) in result.stderr and "Traceback" not in result.stderr


def test_workers_share_the_listener_and_a_dead_worker_is_replaced(backends):
    v12 = {"v1": backends.port["v1"], "v2": backends.port["v2"]}
    with run_sidecar(policy("reviews", v12, CANARY), workers=2) as sidecar:
        workers = sidecar.children()
        assert len(workers) == 2
        listing = subprocess.run(["ss", "-ltnpH", f"sport = :{sidecar.outbound[1]}"], capture_output=True, text=True)
        assert {f"pid={pid}," for pid in workers} <= {part[part.index("pid="):].split("fd")[0] for part in listing.stdout.split("users:")[1:]}
        os.kill(workers[0], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while len(set(sidecar.children()) - {workers[0]}) < 2 or admin(sidecar, "GET", "/readyz")[0] != 200:
            assert time.monotonic() < deadline, sidecar.stderr()
            time.sleep(0.1)
        answers = load(sidecar.outbound, 200, connections=8, host="reviews")
        assert all(isinstance(a, Answer) and a.status == 200 for a in answers)
        assert "restarting it" in sidecar.stderr()


def _command_line(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


@pytest.mark.parametrize(("env", "optimized"), [({}, True), ({"MESHLET_WORKER_DEBUG": "1"}, False)])
def test_one_worker_serves_optimized_in_the_same_process_unless_debugging(backends, env, optimized):
    """`--workers 1` re-executes itself under `python -O` (same pid, so signals and Pod probes
    still reach it) and still routes; MESHLET_WORKER_DEBUG keeps mitmproxy's checks on."""
    v12 = {"v1": backends.port["v1"], "v2": backends.port["v2"]}
    with run_sidecar(policy("reviews", v12, CANARY), workers=1, env=env) as sidecar:
        argv = _command_line(sidecar.process.pid)
        assert (argv[1] == "-O") == optimized, argv
        assert argv[argv.index(MESHLET) + 1] == "run"  # still the console script: `pkill -f "meshlet run"` finds it
        assert sidecar.children() == []
        assert get(sidecar.outbound, host="reviews").status == 200


async def _ws_echo(reader, writer) -> None:
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, CloseConnection, Message, Request, TextMessage

    ws = WSConnection(ConnectionType.SERVER)
    try:
        while data := await reader.read(4096):
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, Request):
                    writer.write(ws.send(AcceptConnection()))
                elif isinstance(event, TextMessage):
                    writer.write(ws.send(Message(data=f"echo:{event.data}")))
                elif isinstance(event, CloseConnection):
                    writer.write(ws.send(event.response()))
                    return
    finally:
        writer.close()


def test_websocket_upgrade_passes_through_a_streamed_route(backends):
    import asyncio

    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, Message, Request, TextMessage

    server = asyncio.run_coroutine_threadsafe(asyncio.start_server(_ws_echo, "127.0.0.1", 0), backends.loop).result(10)
    backends.servers["ws"] = server
    port = server.sockets[0].getsockname()[1]
    with run_sidecar(policy("wsecho", {"ws": port}, "    - name: ws\n      to: [{backend: ws}]\n")) as sidecar, \
            socket.create_connection(sidecar.outbound, timeout=10) as conn:
        ws = WSConnection(ConnectionType.CLIENT)
        conn.sendall(ws.send(Request(host="wsecho", target="/chat")))
        received: list = []
        for message in ("hello", "again"):
            while not any(isinstance(e, AcceptConnection) for e in received):
                ws.receive_data(conn.recv(4096))
                received += list(ws.events())
            conn.sendall(ws.send(Message(data=message)))
            while not any(isinstance(e, TextMessage) and e.data == f"echo:{message}" for e in received):
                data = conn.recv(4096)
                assert data, received
                ws.receive_data(data)
                received += list(ws.events())


def test_strict_hosts_and_istio_metrics(backends):
    v12 = {"v1": backends.port["v1"], "v2": backends.port["v2"]}
    extra = ("--strict-hosts", "--metrics-compat", "istio", "--workload", "frontend")
    text = policy("reviews", v12, CANARY)
    for name, port in v12.items():  # what each backend declares it is: its destination_version
        text = text.replace(f'{name}: {{address: "127.0.0.1:{port}"}}', f'{name}: {{address: "127.0.0.1:{port}", version: {name}}}')
    with run_sidecar(text, *extra) as sidecar:
        stray = get(sidecar.outbound, host=f"127.0.0.1:{backends.port['v1']}")
        assert stray.status == 404 and "no policy governs host" in stray.body
        seen = shares(load(sidecar.outbound, 100, host="reviews"))
        istio = {
            s.labels["destination_version"]: s.value for s in metric_samples(sidecar, "istio_requests_total")
            if s.labels["response_code"] == "200"
        }
        assert istio == {version: float(n) for version, n in seen.items()}
        sample = next(s for s in metric_samples(sidecar, "istio_requests_total") if s.labels["response_code"] == "200")
        assert sample.labels["reporter"] == "source" and sample.labels["source_workload"] == "frontend"
        assert sample.labels["destination_service"] == "reviews"


def test_a_second_sidecar_on_the_same_ports_is_refused(backends, tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(policy("reviews", {"v1": backends.port["v1"]}, "    - name: all\n      to: [{backend: v1}]\n"))
    with run_sidecar(path.read_text(), workers=2) as first:
        result = subprocess.run(
            [MESHLET, "run", "--policy", str(path), "--workers", "2", "--outbound", f"127.0.0.1:{first.outbound[1]}",
             "--inbound", f"127.0.0.1:{free_port()}", "--admin", f"127.0.0.1:{free_port()}"],
            capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 1
        assert result.stderr.strip().splitlines()[-1].startswith(f"meshlet: cannot listen on 127.0.0.1:{first.outbound[1]}")
