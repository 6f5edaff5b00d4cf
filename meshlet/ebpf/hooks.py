"""A set of cgroup eBPF hooks compiled from one C file: load, attach, pin, adopt, remove.

Both accelerations (sockmap redirect, connect4 split) follow the same life cycle, so it lives
here once. Programs are attached exclusively (flags 0): attaching replaces whatever program of
that type a crashed agent left on the cgroup, in one step, so a hook is never attached twice.
Maps are pinned under `<pin root>/<set>-<cgroup id>/`; when a restart finds them, bcc opens
them instead of creating new ones (see bpf/meshlet_pin.h), so live sockets, weights and
counters carry over a `kill -9` of the agent.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshlet.ebpf import bpfsys, pins, source
from meshlet.ebpf.cgroup import Cgroup

log = logging.getLogger("meshlet.ebpf")
PIN_ROOT = pins.PIN_DIR


class HookError(OSError):
    """A hook could not be loaded or attached; the message is one line naming what and where.

    An OSError because the kernel (or bcc on its behalf) refused: the agent command already
    turns OSError into its one-line exit."""


@dataclass(frozen=True, slots=True)
class Hook:
    function: str
    prog_type: int
    attach_type: int
    map: str | None = None  # attach to this map (sk_msg → its sockhash) instead of the cgroup


@dataclass(frozen=True, slots=True)
class HookSet:
    name: str  # the pin directory's prefix
    source: str  # file in bpf/
    hooks: tuple[Hook, ...]
    maps: tuple[str, ...]  # pinned, and adopted on restart


class CgroupHooks:
    """One `HookSet` live on one cgroup. `start()` then `detach()` + `close()` (or `stop()`)."""

    def __init__(self, spec: HookSet, cgroup: Cgroup, cflags: Sequence[str] = (), pin_root: Path = PIN_ROOT) -> None:
        self.spec = spec
        self.cgroup = cgroup
        self.cflags = tuple(cflags)
        self.pin_dir = pin_root / f"{spec.name}-{cgroup.id}"
        self.bpf: Any = None
        self.adopted = False
        self._functions: dict[str, Any] = {}
        self._cgroup_fd: int | None = None

    def start(self) -> None:
        """Compile, load and attach; adopt the maps a previous agent pinned, if all are there."""
        from bcc import BPF

        self.adopted = all((self.pin_dir / name).exists() for name in self.spec.maps)
        if not self.adopted:
            self._unpin()  # a partial set (a crash while pinning) cannot be adopted
        try:
            self._load()
        except HookError as e:
            if not self.adopted:
                raise
            # Maps of another meshlet version (other sizes) do not fit this program: start afresh.
            log.warning("%s: cannot adopt the maps in %s (%s); creating new ones", self.spec.name, self.pin_dir, e)
            self.close()
            self.adopted = False
            self._load()
        self._cgroup_fd = os.open(self.cgroup.path, os.O_RDONLY | os.O_DIRECTORY)
        # Map hooks first: a socket copies the map's programs when it is inserted.
        for hook in sorted(self.spec.hooks, key=lambda h: h.map is None):
            target = self.map_fd(hook.map) if hook.map else self._cgroup_fd
            try:
                BPF.attach_func(self._functions[hook.function], target, hook.attach_type)
            except Exception as e:
                where = f"map {hook.map}" if hook.map else f"cgroup {self.cgroup.path}"
                raise HookError(f"cannot attach {hook.function} to {where}: {e}") from e
        for name in self.spec.maps:
            if not self.adopted:
                pins.pin(self.map_fd(name), name, self.pin_dir)
        for hook in self.spec.hooks:
            pins.pin(self._functions[hook.function].fd, hook.function, self.pin_dir)
        log.info("%s: attached to %s (%s maps)", self.spec.name, self.cgroup.path, "adopted" if self.adopted else "new")

    def _load(self) -> None:
        from bcc import BPF

        flags = [*source.include_flags(), *self.cflags]
        if self.adopted:
            flags.append(f'-DMESHLET_PIN_DIR="{self.pin_dir}"')
        try:
            self.bpf = BPF(src_file=os.fsencode(source.BPF_DIR / self.spec.source), cflags=flags)
            for hook in self.spec.hooks:
                self._functions[hook.function] = self.bpf.load_func(
                    hook.function.encode(), hook.prog_type, attach_type=hook.attach_type
                )
        except Exception as e:  # bcc raises bare Exception for compile and load errors
            raise HookError(f"cannot load {self.spec.source}: {str(e).splitlines()[0]}") from e

    def map_fd(self, name: str) -> int:
        from bcc import libbcc

        fd = libbcc.lib.bpf_table_fd(self.bpf.module, name.encode())
        if fd < 0:
            raise HookError(f"{self.spec.source} has no map {name}")
        return fd

    def table(self, name: str) -> Any:
        return self.bpf.get_table(name.encode())

    def prog_id(self, function: str) -> int:
        return bpfsys.prog_id(self._functions[function].fd)

    def detach(self) -> None:
        """Detach the cgroup hooks: new sockets are no longer touched; existing ones keep going."""
        if self._cgroup_fd is None:
            return
        for hook in self.spec.hooks:
            if hook.map is None and hook.function in self._functions:
                try:
                    bpfsys.detach(self._functions[hook.function].fd, self._cgroup_fd, hook.attach_type)
                except OSError as e:
                    if e.errno != errno.ENOENT:  # already replaced or the cgroup is gone
                        raise
        os.close(self._cgroup_fd)
        self._cgroup_fd = None

    def close(self, keep_maps: bool = False) -> None:
        """Unpin and free everything, or leave the maps pinned for the next agent to adopt."""
        if self.bpf is None:
            return  # never loaded: the pins (if any) are a previous agent's, still in use
        try:
            if keep_maps:
                for hook in self.spec.hooks:
                    _unlink(self.pin_dir / hook.function)
            else:
                self._unpin()
        finally:
            if self.bpf is not None:
                self.bpf.cleanup()
                self.bpf = None

    def stop(self) -> None:
        try:
            self.detach()
        finally:
            self.close()

    def _unpin(self) -> None:
        if not self.pin_dir.is_dir():
            return
        for path in self.pin_dir.iterdir():
            _unlink(path)
        self.pin_dir.rmdir()


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
