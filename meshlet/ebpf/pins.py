"""The agent's pinned maps, under /sys/fs/bpf/meshlet/agent/: visible to bpftool while the agent
runs, and the trace a crashed agent leaves, which the next start removes before pinning afresh.
Other parts of meshlet pin under /sys/fs/bpf/meshlet/ too; the agent touches only its own directory.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

PIN_DIR = Path("/sys/fs/bpf/meshlet/agent")


def pin(fd: int, name: str, directory: Path = PIN_DIR) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.unlink(missing_ok=True)  # left by an agent killed with -9
    _obj_pin(fd, path)
    return path


def unpin_all(directory: Path = PIN_DIR) -> list[str]:
    """Remove every pin in the agent's directory, and the directory; returns the names removed."""
    if not directory.is_dir():
        return []
    removed = []
    for path in sorted(directory.iterdir()):
        path.unlink()
        removed.append(path.name)
    directory.rmdir()
    return removed


def _obj_pin(fd: int, path: Path) -> None:
    from bcc import libbcc  # libbcc links libbpf, whose bpf_obj_pin bcc 0.26 does not wrap

    obj_pin = libbcc.lib.bpf_obj_pin
    obj_pin.restype, obj_pin.argtypes = ctypes.c_int, [ctypes.c_int, ctypes.c_char_p]
    result = obj_pin(fd, os.fsencode(path))
    if result != 0:
        errno = -result if result < 0 else ctypes.get_errno()
        hint = f" ({path.parent} must be on bpffs)" if errno == 1 else ""
        raise OSError(errno, f"cannot pin BPF map at {path}: {os.strerror(errno)}{hint}")
