"""Starting the processes a benchmark measures, and reading their CPU time and peak memory.

CPU and RSS are read from /proc over the whole process tree, so a multi-worker sidecar is
charged for all of its workers.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s")


def tree(pid: int) -> list[int]:
    """pid and all its descendants, read from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pids: Sequence[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / CLOCK_TICKS


def _status_bytes(pids: Sequence[int], field: str) -> list[int]:
    """One memory field of /proc/PID/status (kB there) for each process still alive, in bytes."""
    found = []
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    found.append(int(line.split()[1]) * 1024)
    return found


def peak_rss_each(pids: Sequence[int]) -> list[int]:
    """Each process's peak resident set (VmHWM), in bytes."""
    return _status_bytes(pids, "VmHWM")


def rss_each(pids: Sequence[int]) -> list[int]:
    """Each process's resident set now (VmRSS), in bytes: idle memory, before any load."""
    return _status_bytes(pids, "VmRSS")


def peak_rss_bytes(pids: Sequence[int]) -> int:
    return sum(peak_rss_each(pids))


@dataclass
class Service:
    """A process under test (or a backend), with the pids to charge CPU and memory to."""

    name: str
    proc: subprocess.Popen
    log: Path | None = None

    def pids(self) -> list[int]:
        return tree(self.proc.pid)

    def died(self) -> str | None:
        """How it ended, if it did (a crash, or a signal from outside the run): its figures would be
        another target's, or nobody's."""
        if self.proc.poll() is None:
            return None
        return f"{self.name} exited with {self.proc.returncode}: {last_line(self.log)}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def last_line(log: Path | None) -> str:
    lines = log.read_text(errors="replace").strip().splitlines() if log and log.exists() else []
    return lines[-1] if lines else "(no output)"


def wait_log(log: Path, text: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Wait for a process that says it is ready in its log (the agent: compiling takes seconds)."""
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        if proc.poll() is not None:
            raise RuntimeError(f"{Path(proc.args[0]).name} exited with {proc.returncode}: {last_line(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{Path(proc.args[0]).name} not ready after {timeout:.0f}s (no {text!r} in {log})")
        time.sleep(0.1)


@contextlib.contextmanager
def service(
    name: str, argv: Sequence[str], ports: Sequence[int], log: Path, ready: str | None = None
) -> Iterator[Service]:
    """Start argv, wait until every port listens (and `ready` is logged), stop it on exit whatever happens."""
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    svc = Service(name, proc, log)
    try:
        for port in ports:
            wait_port(port, proc=proc)
        if ready:
            wait_log(log, ready, proc)
        yield svc
    finally:
        svc.stop()
