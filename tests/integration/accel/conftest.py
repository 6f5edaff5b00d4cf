"""Fixtures for the acceleration tests: a real cgroup, a private pin root, workload processes.

Everything a test creates (cgroups, pinned objects, processes) is removed in the fixtures'
teardown, whether the test passed or not.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from agent_support import Workload

from meshlet.ebpf import capability
from meshlet.ebpf.cgroup import UNIFIED, Cgroup, temporary

WORKLOAD = Path(__file__).with_name("workload.py")


def _missing() -> str | None:
    problem = capability.missing(capability.probe())
    if problem is not None:
        return problem
    if not (UNIFIED / "cgroup.procs").exists():
        return f"no cgroup v2 hierarchy at {UNIFIED}"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "bcc (python3-bpfcc) is not importable"
    return None


@pytest.fixture(scope="session")
def ebpf_ready() -> None:
    problem = _missing()
    if problem is not None:
        pytest.skip(f"needs eBPF with cgroup v2: {problem}")


@pytest.fixture
def cgroup(ebpf_ready: None) -> Iterator[Cgroup]:
    with temporary(f"meshlet-test-{uuid.uuid4().hex[:8]}") as cg:
        yield cg


@pytest.fixture
def pin_root(ebpf_ready: None) -> Iterator[Path]:
    """A private pin root, so tests never touch a running agent's /sys/fs/bpf/meshlet."""
    root = Path(f"/sys/fs/bpf/meshlet-test-{uuid.uuid4().hex[:8]}")
    try:
        yield root
    finally:
        if root.exists():  # left by a failed test: pins are files to bpffs, so rmtree unpins them
            shutil.rmtree(root)


@pytest.fixture
def workloads() -> Iterator[Callable[..., Workload]]:
    """Start workloads inside a cgroup (`start(cgroup)`) or outside any test cgroup (`start()`)."""
    started: list[Workload] = []

    def start(cg: Cgroup | None = None) -> Workload:
        argv = [sys.executable, str(WORKLOAD)]
        workload = Workload(cg.command(argv) if cg else argv)
        started.append(workload)
        return workload

    try:
        yield start
    finally:
        for workload in started:
            workload.close()


class Greeter:
    """A backend outside the cgroup: greets each connection with its name, and again per line."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.server = socket.create_server(("127.0.0.1", 0), backlog=4096)
        self.port = self.server.getsockname()[1]
        self.accepted = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._greet, args=(conn,), daemon=True).start()

    def _greet(self, conn: socket.socket) -> None:
        line = f"{self.name}\n".encode()
        with conn, contextlib.suppress(OSError):
            conn.sendall(line)
            while conn.recv(64):
                conn.sendall(line)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self.server.close()
        self._thread.join(timeout=5)


@pytest.fixture
def greeters() -> Iterator[Callable[[str], Greeter]]:
    made: list[Greeter] = []

    def make(name: str) -> Greeter:
        greeter = Greeter(name)
        made.append(greeter)
        return greeter

    try:
        yield make
    finally:
        for greeter in made:
            greeter.close()


MESHLET = Path(sys.executable).parent / "meshlet"
AGENT_START_TIMEOUT = 60.0


class Agent:
    """A `meshlet agent` process with its stderr in a file."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.log = log
        with log.open("w") as stderr:
            self.process = subprocess.Popen([str(MESHLET), "agent", *argv], stdout=subprocess.DEVNULL, stderr=stderr)

    def text(self) -> str:
        return self.log.read_text()

    def wait_for_log(self, needle: str, count: int = 1, timeout: float = AGENT_START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while self.text().count(needle) < count:
            assert self.process.poll() is None, f"agent exited {self.process.returncode}: {self.text()}"
            assert time.monotonic() < deadline, f"agent never logged {needle!r} x{count}: {self.text()}"
            time.sleep(0.05)


@pytest.fixture
def run_agent(tmp_path: Path) -> Iterator[Callable[[list[str]], Agent]]:
    """Start `meshlet agent ARGV...` and wait until it is ready; killed in teardown if still running."""
    started: list[Agent] = []

    def start(argv: list[str]) -> Agent:
        agent = Agent(argv, tmp_path / f"agent-{len(started)}.log")
        started.append(agent)
        agent.wait_for_log("agent: ready")
        return agent

    try:
        yield start
    finally:
        for agent in started:
            if agent.process.poll() is None:
                agent.process.kill()
                agent.process.wait(timeout=30)
