"""mitmproxy as the programmable engine, end to end: users' addon scripts (`run --addon`) and
`meshlet tap` against real `meshlet run --engine mitmproxy` processes, on one worker and on two."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from mitmproxy import io as mitmio
from sidecar_support import MESHLET, Backends, Client, Tap, free_port, get, policy, run_sidecar

pytestmark = [pytest.mark.timeout(120), pytest.mark.engines("mitmproxy")]  # addons are mitmproxy's

ROUTE = "    - name: all\n      to: [{backend: v1}]\n"

HEADER_ADDON = '''\
import os


class WorkerHeader:
    """Class-style addon: tells which worker answered."""

    def response(self, flow):
        flow.response.headers["x-addon-worker"] = str(os.getpid())


addons = [WorkerHeader()]
'''

ANSWER_ADDON = '''\
from mitmproxy import http


def request(flow):
    if flow.request.path.startswith("/addon/"):
        flow.response = http.Response.make(200, b"answered by the addon\\n", {"content-type": "text/plain"})
'''


@pytest.fixture(scope="module")
def backends():
    b = Backends()
    try:
        b.start("v1")
        yield b
    finally:
        b.close()


@pytest.fixture(scope="module")
def scripts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tap-addons")
    found = {}
    for name, text in (("header", HEADER_ADDON), ("answer", ANSWER_ADDON)):
        found[name] = root / f"{name}.py"
        found[name].write_text(text)
    return found


def run_with_addons(backends, scripts, workers: int):
    return run_sidecar(
        policy("reviews", {"v1": backends.port["v1"]}, ROUTE), "--engine", "mitmproxy",
        "--addon", str(scripts["header"]), "--addon", str(scripts["answer"]),
        app_port=backends.port["v1"], workers=workers,
    )


@pytest.fixture(scope="module")
def sidecar(backends, scripts):
    with run_with_addons(backends, scripts, workers=1) as sidecar:
        yield sidecar
        assert "Traceback" not in sidecar.stderr()


def answer_worker(address, path: str, request_id: str) -> str:
    """GET on a fresh connection (so --workers spread them); the addon's worker header."""
    import http.client

    conn = http.client.HTTPConnection(*address, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": "reviews", "x-request-id": request_id})
        response = conn.getresponse()
        response.read()
        assert response.status == 200
        return response.getheader("x-addon-worker") or ""
    finally:
        conn.close()


def sockets(pids: list[int]) -> int:
    return sum(
        os.readlink(fd).startswith("socket:") for pid in pids for fd in Path(f"/proc/{pid}/fd").iterdir()
        if fd.exists()
    )


def settled_sockets(pids: list[int], seconds: float = 10.0) -> int:
    """The processes' socket count once closing connections are gone (two equal readings apart)."""
    deadline = time.monotonic() + seconds
    count = sockets(pids)
    while time.monotonic() < deadline:
        time.sleep(0.2)
        count, previous = sockets(pids), count
        if count == previous:
            break
    return count


def test_an_addon_adds_a_header_to_every_response_in_both_directions(sidecar):
    client = Client(sidecar.outbound)
    try:
        for _ in range(3):
            answer = client.request(path="/")
            assert (answer.status, answer.backend) == (200, "v1")
        assert answer_worker(sidecar.outbound, "/", "h-1") == str(sidecar.process.pid)
        assert answer_worker(sidecar.inbound, "/", "h-2") == str(sidecar.process.pid)
    finally:
        client.close()


def test_an_addon_answers_requests_itself(sidecar):
    answer = get(sidecar.outbound, path="/addon/hello")
    assert (answer.status, answer.body, answer.backend) == (200, "answered by the addon\n", None)
    assert get(sidecar.outbound, path="/not-for-the-addon").backend == "v1"


def test_tap_prints_a_line_per_request_and_saves_a_flow_file(sidecar, tmp_path):
    saved = tmp_path / "requests.mitm"
    tap = Tap(sidecar, "--save", str(saved))
    try:
        tap.attach(lambda request_id: answer_worker(sidecar.outbound, "/probe", request_id))
        ids = [f"req-{n}" for n in range(5)]
        for request_id in ids:
            answer_worker(sidecar.outbound, f"/items/{request_id}?q=1", request_id)
        answer_worker(sidecar.outbound, "/addon/hi", "by-addon")
        answer_worker(sidecar.inbound, "/in", "inbound-1")
        lines = tap.wait_for([*ids, "by-addon", "inbound-1"])
    finally:
        code, err = tap.stop(signal.SIGTERM)
    assert code == 0, err
    assert re.fullmatch(
        r"\d\d:\d\d:\d\d\.\d{3} outbound 200 +\d+\.\dms GET reviews/items/req-0\?q=1  route=all backend=v1 id=req-0",
        lines[0],
    ), lines[0]
    assert " GET reviews/addon/hi " in lines[5]
    assert re.search(r" inbound  200 .* GET reviews/in  route=inbound backend=app id=inbound-1$", lines[6])

    with open(saved, "rb") as f:
        flows = {fl.request.headers.get("x-request-id"): fl for fl in mitmio.FlowReader(f).stream()}
    assert set(ids) | {"by-addon", "inbound-1"} <= flows.keys()
    first = flows["req-0"]
    assert (first.request.method, first.request.pretty_url, first.response.status_code) == (
        "GET", "http://reviews/items/req-0?q=1", 200)
    assert first.metadata["meshlet"] | {"seconds": 0} == {
        "direction": "outbound", "route": "all", "backend": "v1", "peer_identity": "", "request_id": "req-0",
        "seconds": 0}
    assert flows["inbound-1"].metadata["meshlet"]["direction"] == "inbound"


def test_tap_of_two_workers_merges_both_and_leaves_no_connection_behind(backends, scripts):
    with run_with_addons(backends, scripts, workers=2) as sidecar:
        pids = [sidecar.process.pid, *sidecar.children()]
        assert len(pids) == 3
        for n in range(4):
            answer_worker(sidecar.outbound, "/", f"warm-{n}")
        before = settled_sockets(pids)

        tap = Tap(sidecar)
        try:
            served: dict[str, str] = {}
            for n in range(400):  # until probes served by each worker have shown up in the tap
                served[f"probe-{n}"] = answer_worker(sidecar.outbound, "/probe", f"probe-{n}")
                time.sleep(0.01)
                tapped = {worker for rid, worker in served.items() if tap.line_for(rid)}
                if len(tapped) == 2:
                    break
            assert tapped == {str(pid) for pid in pids[1:]}
            ids = [f"req-{n}" for n in range(30)]
            workers = {answer_worker(sidecar.outbound, f"/{rid}", rid) for rid in ids}
            assert len(workers) == 2  # fresh connections spread over both (SO_REUSEPORT)
            tap.wait_for(ids)
            assert sockets(pids) > before  # the client's and the supervisor's to each worker
        finally:
            code, err = tap.stop()
        assert code == 0, err

        deadline = time.monotonic() + 10
        while sockets(pids) != before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sockets(pids) == before
        assert "Traceback" not in sidecar.stderr()


def test_tap_of_an_unreachable_sidecar_is_one_line_and_exit_1():
    url = f"http://127.0.0.1:{free_port()}"
    result = subprocess.run([MESHLET, "tap", "--sidecar", url], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"meshlet: sidecar unreachable at {url}/tap: [Errno 111] Connection refused"]


@pytest.mark.parametrize(("text", "line", "error", "workers"), [
    ("x = 1\ndef request(flow)\n    pass\n", 2, "SyntaxError: expected ':'", 2),
    ("def load(loader):\n    loader.add_option('x', int, 'a', 'an int')\n", 2, "TypeError: Expected <class 'int'>", 1),
], ids=["syntax-error-2-workers", "load-hook-raises-1-worker"])
def test_a_broken_addon_is_one_line_naming_the_file_and_nothing_is_served(tmp_path, text, line, error, workers):
    script = tmp_path / "broken.py"
    script.write_text(text)
    (tmp_path / "policy.yaml").write_text(policy("reviews", {"v1": 9}, ROUTE))
    outbound = free_port()
    result = subprocess.run(
        [MESHLET, "run", "--policy", str(tmp_path / "policy.yaml"), "--engine", "mitmproxy", "--addon", str(script),
         "--outbound", f"127.0.0.1:{outbound}", "--inbound", f"127.0.0.1:{free_port()}",
         "--admin", f"127.0.0.1:{free_port()}", "--workers", str(workers)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    [message] = result.stderr.splitlines()
    assert message.startswith(f"meshlet: addon {script}:{line}: {error}"), message
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", outbound), timeout=5):
        pass
