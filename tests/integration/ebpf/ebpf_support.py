"""Helpers the node agent's kernel tests import: running commands in namespaces, the agent
process, and the traffic of QoS tests (a bulk flood, a small request/response pinger)."""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

MESHLET = Path(sys.executable).parent / "meshlet"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


class Agent:
    """`meshlet agent` in a namespace (nsenter, not `ip netns exec`, which would hide bpffs and tracefs)."""

    def __init__(self, netns: str, policy: Path, pin_dir: Path, log: Path, interval: str = "200ms"):
        self.log = log
        self.netns = netns
        command = [str(MESHLET), "agent", "--policy", str(policy), "--pin-dir", str(pin_dir)]
        command += ["--metrics", "127.0.0.1:15090", "--interval", interval]
        with log.open("w") as stderr:
            self.proc = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{netns}", *command], stdout=subprocess.DEVNULL, stderr=stderr
            )

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "agent: ready" in self.log.read_text():
                return
            if self.proc.poll() is not None:
                pytest.fail(f"agent exited {self.proc.returncode}: {self.log.read_text()}")
            time.sleep(0.1)
        pytest.fail(f"agent not ready in {timeout}s: {self.log.read_text()}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def metrics(self) -> str:
        with inside(self.netns):
            sock = socket.create_connection(("127.0.0.1", 15090), timeout=10)
        conn = http.client.HTTPConnection("127.0.0.1", 15090, timeout=10)
        conn.sock = sock
        try:
            conn.request("GET", "/metrics")
            response = conn.getresponse()
            assert response.status == 200, response.status
            return response.read().decode()
        finally:
            conn.close()


_libc = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def inside(netns: str) -> Iterator[None]:
    """Run the block in `netns` (this thread only): sockets made here stay in that namespace."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if _libc.setns(target, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {netns}")
        yield
    finally:
        _libc.setns(home, _CLONE_NEWNET)
        os.close(target)
        os.close(home)


class Flood:
    """Bulk TCP from left to right as fast as the path allows, until stopped."""

    def __init__(self, netns: str, address: tuple[str, int]):
        with inside(netns):
            self.sock = socket.socket()
        self.sock.settimeout(10)
        self.sock.connect(address)
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        block = b"b" * 65536
        try:
            while self.running:
                self.sock.sendall(block)
        except OSError:
            pass

    def stop(self) -> None:
        self.running = False
        self.thread.join(timeout=15)
        self.sock.close()


def sink(server: socket.socket) -> None:
    try:
        conn, _ = server.accept()
        with conn:
            while conn.recv(1 << 20):
                pass
    except OSError:
        pass


def echo(server: socket.socket) -> None:
    try:
        conn, _ = server.accept()
        with conn:
            while data := conn.recv(4096):
                conn.sendall(data)
    except OSError:
        pass


class Pinger:
    """Small request/response on the latency port every 20 ms: keeps srtt samples coming."""

    def __init__(self, netns: str, address: tuple[str, int]):
        with inside(netns):
            self.sock = socket.socket()
        self.sock.settimeout(10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.connect(address)
        self.rtts: list[tuple[float, float]] = []
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while self.running:
                start = time.monotonic()
                self.sock.sendall(b"p" * 64)
                got = 0
                while got < 64:
                    got += len(self.sock.recv(64 - got))
                self.rtts.append((start, time.monotonic() - start))
                time.sleep(0.02)
        except OSError:
            pass

    def stop(self) -> None:
        self.running = False
        self.thread.join(timeout=15)
        self.sock.close()
