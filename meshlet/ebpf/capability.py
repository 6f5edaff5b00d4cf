"""What the node agent needs from this machine, checked before anything is attached.

Each check returns one line naming what is missing and how to fix it, so `meshlet agent`
can exit 1 with that line instead of a compiler or kernel traceback.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from dataclasses import dataclass
from pathlib import Path

TRACEFS = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))
BPFFS = Path("/sys/fs/bpf")
TRACEPOINTS = ("sock/inet_sock_set_state", "tcp/tcp_probe", "tcp/tcp_retransmit_skb")

_SYS_BPF = 321  # x86_64
_BPF_PROG_LOAD = 5


class CapabilityMissing(Exception):
    """The machine cannot run the agent; the message is one line saying what to do."""


@dataclass(frozen=True, slots=True)
class Machine:
    """The facts the checks read, gathered at the edge so the checks stay testable."""

    euid: int
    headers: Path
    tracefs: Path | None
    bpffs_mounted: bool
    bpf_errno: int  # errno of a probing bpf() call: EPERM/ENOSYS mean no usable BPF


def missing(machine: Machine) -> str | None:
    """The first missing capability as one line, or None when the agent can run."""
    if machine.euid != 0:
        return "needs root (CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON): run as root or as a privileged DaemonSet"
    if machine.bpf_errno == errno.ENOSYS:
        return "kernel has no bpf() syscall: build it with CONFIG_BPF_SYSCALL=y"
    if machine.bpf_errno == errno.EPERM:
        return "bpf() is refused (EPERM): grant CAP_BPF or set kernel.unprivileged_bpf_disabled appropriately"
    if not _is_dir(machine.headers / "include"):
        return (
            f"no kernel headers at {machine.headers} for bcc: install linux-headers-amd64 "
            f"and link it there (scripts/setup does)"
        )
    if machine.tracefs is None:
        return "no tracefs: mount -t tracefs tracefs /sys/kernel/tracing"
    for tracepoint in TRACEPOINTS:
        if not _is_dir(machine.tracefs / "events" / tracepoint):
            return f"kernel lacks tracepoint {tracepoint} (needed for TCP observation)"
    if not machine.bpffs_mounted:
        return f"no bpffs at {BPFFS}: mount -t bpf bpf {BPFFS}"
    return None


def probe() -> Machine:
    return Machine(
        euid=os.geteuid(),
        headers=Path("/lib/modules") / platform.release() / "build",
        tracefs=next((p for p in TRACEFS if _is_dir(p / "events")), None),
        bpffs_mounted=os.path.ismount(BPFFS),
        bpf_errno=_bpf_errno(),
    )


def require() -> None:
    """Raise `CapabilityMissing` with one line unless this machine can run the agent."""
    problem = missing(probe())
    if problem is not None:
        raise CapabilityMissing(problem)


def _is_dir(path: Path) -> bool:
    """is_dir that treats "not allowed to look" as "not there"."""
    try:
        return path.is_dir()
    except OSError:
        return False


def _bpf_errno() -> int:
    """errno of a deliberately invalid BPF_PROG_LOAD: EINVAL means the syscall is there and allowed."""
    libc = ctypes.CDLL(None, use_errno=True)
    attr = ctypes.create_string_buffer(128)  # all zero: an invalid program
    if libc.syscall(_SYS_BPF, _BPF_PROG_LOAD, attr, ctypes.sizeof(attr)) == 0:
        return 0
    return ctypes.get_errno()
