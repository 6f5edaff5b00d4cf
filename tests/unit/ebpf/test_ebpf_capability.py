"""One line per missing capability, checked from gathered facts (no kernel needed)."""

from __future__ import annotations

import errno
from pathlib import Path

from meshlet.ebpf.capability import Machine, missing


def machine(tmp_path: Path, **changes) -> Machine:
    headers = tmp_path / "build"
    (headers / "include").mkdir(parents=True, exist_ok=True)
    tracefs = tmp_path / "tracing"
    for tp in ("sock/inet_sock_set_state", "tcp/tcp_probe", "tcp/tcp_retransmit_skb"):
        (tracefs / "events" / tp).mkdir(parents=True, exist_ok=True)
    facts = {"euid": 0, "headers": headers, "tracefs": tracefs, "bpffs_mounted": True, "bpf_errno": errno.EINVAL}
    return Machine(**{**facts, **changes})


def test_a_capable_machine_misses_nothing(tmp_path):
    assert missing(machine(tmp_path)) is None


def test_each_missing_piece_is_named_with_its_fix(tmp_path):
    cases = {
        "needs root": {"euid": 1000},
        "no bpf() syscall": {"bpf_errno": errno.ENOSYS},
        "bpf() is refused (EPERM)": {"bpf_errno": errno.EPERM},
        f"no kernel headers at {tmp_path / 'nowhere'}": {"headers": tmp_path / "nowhere"},
        "no tracefs: mount -t tracefs": {"tracefs": None},
        "no bpffs at /sys/fs/bpf": {"bpffs_mounted": False},
    }
    for expected, change in cases.items():
        message = missing(machine(tmp_path, **change))
        assert message is not None and expected in message, (change, message)
        assert "\n" not in message


def test_a_kernel_without_a_tracepoint_is_named(tmp_path):
    m = machine(tmp_path)
    (m.tracefs / "events" / "tcp" / "tcp_probe").rmdir()
    assert missing(m) == "kernel lacks tracepoint tcp/tcp_probe (needed for TCP observation)"
