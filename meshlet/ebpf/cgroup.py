"""cgroup v2 directories the eBPF hooks attach to, and putting processes in them.

In Kubernetes the hooks attach to the pod's own cgroup; on a plain host (and in tests) meshlet
creates one under the unified hierarchy and starts the workload inside it, so only that
workload's sockets see the hooks.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

UNIFIED = Path("/sys/fs/cgroup/unified")


class CgroupError(Exception):
    """A cgroup could not be used; the message names the path and what to do."""


@dataclass(frozen=True, slots=True)
class Cgroup:
    path: Path

    @property
    def id(self) -> int:
        """The kernel's cgroup id (the directory's inode): stable while the cgroup exists."""
        return self.path.stat().st_ino

    def command(self, argv: Sequence[str]) -> list[str]:
        """`argv` wrapped so the process joins this cgroup before it execs (no window outside it)."""
        procs = self.path / "cgroup.procs"
        return ["/bin/sh", "-c", f'echo $$ > "{procs}" && exec "$@"', "meshlet-cgroup", *argv]

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(f"{pid}\n")

    def pids(self) -> tuple[int, ...]:
        try:
            return tuple(int(line) for line in (self.path / "cgroup.procs").read_text().split())
        except FileNotFoundError:
            return ()

    @contextmanager
    def fd(self) -> Iterator[int]:
        """An O_RDONLY descriptor of the directory: what BPF_PROG_ATTACH wants for a cgroup."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise CgroupError(f"cannot open cgroup {self.path}: {e.strerror}") from e
        try:
            yield fd
        finally:
            os.close(fd)


def unified_root() -> Path:
    if not (UNIFIED / "cgroup.procs").exists():
        raise CgroupError(f"no cgroup v2 hierarchy at {UNIFIED}: mount -t cgroup2 none {UNIFIED}")
    return UNIFIED


def create(name: str, root: Path | None = None) -> Cgroup:
    """A child cgroup `name` of the unified root (created if missing)."""
    path = (root or unified_root()) / name
    try:
        path.mkdir(exist_ok=True)
    except OSError as e:
        raise CgroupError(f"cannot create cgroup {path}: {e.strerror}") from e
    return Cgroup(path)


def remove(cgroup: Cgroup, attempts: int = 50) -> None:
    """Move any leftover processes to the parent and delete the cgroup (bounded retries).

    The kernel refuses rmdir while a process is in the cgroup, and a process that just exited
    may still be listed for a moment, hence the short retry loop.
    """
    parent = Cgroup(cgroup.path.parent)
    for _ in range(attempts):
        for pid in cgroup.pids():
            with contextlib.suppress(OSError):  # exited meanwhile
                parent.add(pid)
        try:
            cgroup.path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.02)
    raise CgroupError(f"cannot remove cgroup {cgroup.path}: processes {list(cgroup.pids())} remain")


@contextmanager
def temporary(name: str) -> Iterator[Cgroup]:
    """A cgroup that exists for the `with` block and is removed after it, even on failure."""
    cgroup = create(name)
    try:
        yield cgroup
    finally:
        remove(cgroup)
