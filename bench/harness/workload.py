"""The eBPF targets' workload: a cgroup made for the run, `meshlet agent` on it, and the load
generator stepping into it for its measurements only.

A socket belongs to the cgroup of the task that created it, so moving the bench process in
around one measurement puts exactly that measurement's connections (wrk is a child; the
fixed-rate client runs in-process) under the hooks, and no other target's.
"""

from __future__ import annotations

import contextlib
import os
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from harness.procs import free_port, service

if TYPE_CHECKING:  # imported lazily at run time: runs without BPF never load meshlet.ebpf
    from meshlet.ebpf.cgroup import Cgroup

MESHLET = Path(sys.executable).parent / "meshlet"


def _own_cgroup() -> Path:
    """The unified-hierarchy cgroup this process is in now (where it returns after a measurement)."""
    from meshlet.ebpf.cgroup import unified_root

    line = next(x for x in Path("/proc/self/cgroup").read_text().splitlines() if x.startswith("0::"))
    return unified_root() / line[3:].lstrip("/")


@dataclass(frozen=True)
class Workload:
    cgroup: Cgroup
    home: Path
    pin_root: Path

    @classmethod
    def enter(cls, stack: contextlib.ExitStack, label: str) -> Workload:
        """A fresh cgroup and bpffs pin root, removed by the stack; RuntimeError if BPF is missing."""
        from meshlet.ebpf import capability, cgroup

        problem = capability.missing(capability.probe())
        if problem:
            raise RuntimeError(problem)
        name = f"meshlet-bench-{label}-{uuid.uuid4().hex[:8]}"
        pin_root = Path("/sys/fs/bpf") / name
        try:
            cg = stack.enter_context(cgroup.temporary(name))
        except cgroup.CgroupError as e:
            raise RuntimeError(str(e)) from None
        stack.callback(_rmdir_tree, pin_root)  # runs after the agent (entered later) has unpinned
        return cls(cg, _own_cgroup(), pin_root)

    def agent(self, stack: contextlib.ExitStack, work: Path, flags: list[str]) -> int:
        """`meshlet agent` on this cgroup, ready (programs attached) before it returns; its metrics port."""
        metrics = free_port()
        argv = [str(MESHLET), "agent", "--pin-dir", str(self.pin_root / "agent"), "--metrics",
                f"127.0.0.1:{metrics}", "--cgroup", str(self.cgroup.path), *flags]  # fmt: skip
        log = work / f"agent-{self.pin_root.name}.log"
        stack.enter_context(service(f"agent {self.pin_root.name}", argv, [metrics], log, ready="agent: ready"))
        return metrics

    @contextlib.contextmanager
    def inside(self) -> Iterator[None]:
        self.cgroup.add(os.getpid())
        try:
            yield
        finally:
            (self.home / "cgroup.procs").write_text(f"{os.getpid()}\n")


def _rmdir_tree(path: Path) -> None:
    """The agent removes its pins on SIGTERM; what is left are empty directories."""
    if not path.is_dir():
        return
    deepest_first = sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
    for directory in [*deepest_first, path]:
        with contextlib.suppress(OSError):  # not empty: something still pinned, left for `meshlet agent` to adopt
            directory.rmdir()


def agent_counter(port: int, name: str) -> float:
    """The sum of one counter's samples on the agent's /metrics: evidence the hooks did the work."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)
