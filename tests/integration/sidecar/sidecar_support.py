"""Real backends, a real `meshlet run` subprocess and keep-alive clients for the sidecar tests.

Backends are the demo backends (meshlet.proxy.demo_backend) on ephemeral ports in a
background event loop; the sidecar is `.venv/bin/meshlet run` on ports picked free just
before start; clients are http.client connections so thousands of requests stay fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshlet.proxy.demo_backend import start_backend

MESHLET = str(Path(sys.executable).with_name("meshlet"))
READY = re.compile(r"ready outbound=(\S+) inbound=(\S+) admin=(\S+)")
START_TIMEOUT = 30.0
ENGINE = "lean"  # set per test module by the `engine` fixture (tests/integration/conftest.py)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Backends:
    """Named demo backends in one background event loop; `port[name]` is where each listens."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.servers: dict[str, asyncio.Server] = {}
        self.port: dict[str, int] = {}

    def start(self, name: str, status: int = 200) -> int:
        return self.serve(name, start_backend(name, status=status))

    def serve(self, name: str, starting: Coroutine[Any, Any, asyncio.Server]) -> int:
        """Any asyncio server (e.g. raw_backend's), started and closed in this loop."""
        server = asyncio.run_coroutine_threadsafe(starting, self.loop).result(10)
        self.servers[name] = server
        self.port[name] = server.sockets[0].getsockname()[1]
        return self.port[name]

    def close(self) -> None:
        async def stop() -> None:
            for server in self.servers.values():
                server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@dataclass
class Sidecar:
    process: subprocess.Popen
    outbound: tuple[str, int]
    inbound: tuple[str, int]
    admin: tuple[str, int]
    log: Path

    @property
    def admin_url(self) -> str:
        return f"http://{self.admin[0]}:{self.admin[1]}"

    def stop(self, timeout: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
            raise

    def stderr(self) -> str:
        return self.log.read_text()

    def children(self) -> list[int]:
        """Worker pids (with --workers N > 1)."""
        pid = self.process.pid
        found: list[int] = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            found += [int(child) for child in (task / "children").read_text().split()]
        return found


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


@contextlib.contextmanager
def run_sidecar(
    policy: str | None, *extra: str, app_port: int | None = None, workers: int = 1, env: Mapping[str, str] = {},
) -> Iterator[Sidecar]:
    """`meshlet run` on free ports with `policy` (None: no --policy, e.g. with --watch-kube in
    `extra`); SIGTERM (then kill) on exit, even on failure."""
    workdir = Path(tempfile.mkdtemp(prefix="meshlet-sidecar-"))
    policy_file = workdir / "policy.yaml"
    policy_file.write_text(policy or "")
    log = workdir / "stderr.log"
    args = [
        MESHLET, "run", *(["--policy", str(policy_file)] if policy is not None else []),
        "--outbound", f"127.0.0.1:{free_port()}", "--inbound", f"127.0.0.1:{free_port()}",
        "--admin", f"127.0.0.1:{free_port()}", "--app", f"127.0.0.1:{app_port or free_port()}", "--workers", str(workers), *extra,
    ]
    if not any(arg in ("--engine", "--addon") for arg in extra):
        args += ["--engine", ENGINE]
    with open(log, "wb") as err:
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, env={**os.environ, "PYTHONUNBUFFERED": "1", **env})
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not (match := READY.search(log.read_text())):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sidecar did not start (exit {process.poll()}):\n{log.read_text()}")
            time.sleep(0.05)
        yield Sidecar(process, _addr(match[1]), _addr(match[2]), _addr(match[3]), log)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        if process.stdout:
            process.stdout.close()
        shutil.rmtree(workdir, ignore_errors=True)


@dataclass(frozen=True)
class Answer:
    status: int
    body: str
    backend: str | None


class Client:
    """One keep-alive HTTP/1.1 connection; reconnects when the server closed it."""

    def __init__(self, address: tuple[str, int], timeout: float = 15.0):
        self.address = address
        self.timeout = timeout
        self.conn: http.client.HTTPConnection | None = None

    def request(
        self, method: str = "GET", path: str = "/", headers: Mapping[str, str] | None = None,
        body: bytes | None = None, host: str = "reviews",
    ) -> Answer:
        if self.conn is None:
            self.conn = http.client.HTTPConnection(*self.address, timeout=self.timeout)
        all_headers = {"Host": host, **(headers or {})}
        self.conn.request(method, path, body=body, headers=all_headers)
        response = self.conn.getresponse()
        data = response.read().decode("utf-8", "replace")
        answer = Answer(response.status, data, response.getheader("x-backend"))
        if response.will_close:
            self.close()
        return answer

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def get(address: tuple[str, int], path: str = "/", **kwargs) -> Answer:
    client = Client(address)
    try:
        return client.request(path=path, **kwargs)
    finally:
        client.close()


def load(address: tuple[str, int], total: int, connections: int = 4, **kwargs) -> list[Answer | Exception]:
    """`total` GETs over `connections` keep-alive connections in parallel; errors are returned, not raised."""

    def worker(count: int) -> list[Answer | Exception]:
        client = Client(address)
        results: list[Answer | Exception] = []
        for _ in range(count):
            try:
                results.append(client.request(**kwargs))
            except (OSError, http.client.HTTPException) as e:
                results.append(e)
                client.close()
        client.close()
        return results

    shares = [total // connections + (i < total % connections) for i in range(connections)]
    with ThreadPoolExecutor(connections) as pool:
        return [r for part in pool.map(worker, shares) for r in part]


def admin(sidecar: Sidecar, method: str, path: str, body: bytes | None = None) -> tuple[int, dict | str]:
    conn = http.client.HTTPConnection(*sidecar.admin, timeout=15)
    try:
        conn.request(method, path, body=body)
        response = conn.getresponse()
        data = response.read().decode()
        if response.getheader("content-type", "").startswith("application/json"):
            return response.status, json.loads(data)
        return response.status, data
    finally:
        conn.close()


def policy(host: str, backends: Mapping[str, int], routes: str, name: str | None = None) -> str:
    """One TrafficPolicy document; `routes` is the YAML list under `routes:` (indented 4)."""
    lines = [f'    {b}: {{address: "127.0.0.1:{port}"}}' for b, port in backends.items()]
    return (
        "apiVersion: meshlet.dev/v1alpha1\nkind: TrafficPolicy\n"
        f"metadata: {{name: {name or host}, namespace: default}}\n"
        f"spec:\n  host: {host}\n  backends:\n" + "\n".join(lines) + "\n  routes:\n" + routes
    )


class Tap:
    """`meshlet tap` as a user runs it; its stdout lines collected by a thread. Call `stop`."""

    def __init__(self, sidecar: Sidecar, *extra: str) -> None:
        self.process = subprocess.Popen(
            [MESHLET, "tap", "--sidecar", sidecar.admin_url, *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def line_for(self, request_id: str) -> str | None:
        return next((line for line in self.lines if line.endswith(f" id={request_id}")), None)

    def wait_for(self, request_ids: list[str], seconds: float = 10.0) -> list[str]:
        deadline = time.monotonic() + seconds
        while (missing := [r for r in request_ids if self.line_for(r) is None]) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not missing, f"not tapped: {missing}\n" + "\n".join(self.lines)
        return [line for r in request_ids if (line := self.line_for(r)) is not None]

    def attach(self, send: Callable[[str], object], tries: int = 200) -> None:
        """Send probes (`send(request_id)`) until one shows: a tap prints nothing before it is attached."""
        for n in range(tries):
            send(f"probe-{n}")
            time.sleep(0.02)
            if self.lines:
                return
        raise AssertionError(f"the tap showed none of {tries} probes")

    def stop(self, sig: int = signal.SIGINT) -> tuple[int, str]:
        """Ctrl-C (or `sig`); its exit status and stderr."""
        self.process.send_signal(sig)
        code = self.process.wait(10)
        self.reader.join(5)
        assert self.process.stderr is not None
        return code, self.process.stderr.read()
