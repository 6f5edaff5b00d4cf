"""A set of cgroup eBPF hooks compiled from one C file: load once, attach to many cgroups, pin, adopt, remove.

Both accelerations (sockmap redirect, connect4 split) follow the same life cycle, so it lives
here once. The programs are compiled and loaded once per node and attached to every cgroup
that needs them (a workload's, or each meshed Pod's): a Pod costs one attach, never a compile.
Programs are attached exclusively (flags 0): attaching replaces whatever program of that type
a crashed agent left on the cgroup, in one step, so a hook is never attached twice. Maps are
pinned under `<pin dir>/`; when a restart finds them, bcc opens them instead of creating new
ones (see bpf/meshlet_pin.h), so live sockets, weights and counters carry over a `kill -9` of
the agent. `sweep` removes meshlet programs from cgroups that should no longer have them (a
Pod that stopped being meshed while no agent ran).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshlet.ebpf import bpfsys, pins, source
from meshlet.ebpf.cgroup import Cgroup, CgroupError

log = logging.getLogger("meshlet.ebpf")
PIN_ROOT = pins.PIN_DIR.parent
PROGRAM_PREFIX = "meshlet_"  # every hook function's name starts with it: how `sweep` knows ours


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
    name: str  # the pin directory's name
    source: str  # file in bpf/
    hooks: tuple[Hook, ...]
    maps: tuple[str, ...]  # pinned, and adopted on restart

    @property
    def cgroup_hooks(self) -> tuple[Hook, ...]:
        return tuple(h for h in self.hooks if h.map is None)


class CgroupHooks:
    """One `HookSet` loaded once: `start()`, then `attach()`/`detach()` per cgroup, then `stop()`."""

    def __init__(self, spec: HookSet, pin_dir: Path, cflags: Sequence[str] = ()) -> None:
        self.spec = spec
        self.cflags = tuple(cflags)
        self.pin_dir = pin_dir
        self.bpf: Any = None
        self.adopted = False
        self.cgroups: dict[Path, int] = {}  # attached: path → cgroup id
        self._functions: dict[str, Any] = {}

    def start(self) -> None:
        """Compile and load; adopt the maps a previous agent pinned, if all are there; attach
        the map hooks. No cgroup yet: `attach` adds them."""
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
        # Map hooks first: a socket copies the map's programs when it is inserted.
        for hook in self.spec.hooks:
            if hook.map is not None:
                try:
                    BPF.attach_func(self._functions[hook.function], self.map_fd(hook.map), hook.attach_type)
                except Exception as e:
                    raise HookError(f"cannot attach {hook.function} to map {hook.map}: {e}") from e
        for name in self.spec.maps:
            if not self.adopted:
                pins.pin(self.map_fd(name), name, self.pin_dir)
        for hook in self.spec.hooks:
            pins.pin(self._functions[hook.function].fd, hook.function, self.pin_dir)
        log.info("%s: loaded (%s maps in %s)", self.spec.name, "adopted" if self.adopted else "new", self.pin_dir)

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

    def attach(self, cgroup: Cgroup) -> int:
        """Attach the cgroup hooks (replacing any earlier program of the same type); the cgroup id."""
        from bcc import BPF

        with cgroup.fd() as fd:
            cgroup_id = os.fstat(fd).st_ino
            for hook in self.spec.cgroup_hooks:
                try:
                    BPF.attach_func(self._functions[hook.function], fd, hook.attach_type)
                except Exception as e:
                    raise HookError(f"cannot attach {hook.function} to cgroup {cgroup.path}: {e}") from e
        self.cgroups[cgroup.path] = cgroup_id
        return cgroup_id

    def detach(self, cgroup: Cgroup) -> None:
        """New sockets of the cgroup are no longer touched; existing ones keep going. A cgroup
        that is gone (the Pod ended) took its hooks with it."""
        self.cgroups.pop(cgroup.path, None)
        try:
            fd = os.open(cgroup.path, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            return
        try:
            for hook in self.spec.cgroup_hooks:
                try:
                    bpfsys.detach(self._functions[hook.function].fd, fd, hook.attach_type)
                except OSError as e:
                    if e.errno != errno.ENOENT:  # already replaced or the cgroup is going
                        raise
        finally:
            os.close(fd)

    def attach_exactly(self, cgroups: Iterable[Cgroup]) -> dict[Path, str]:
        """Attached to these cgroups and no others. A cgroup the kernel refuses (or that is not
        there yet) is named in the result, path → one line; the others are not held up by it."""
        wanted = {cgroup.path: cgroup for cgroup in cgroups}
        errors: dict[Path, str] = {}
        for path in [p for p in self.cgroups if p not in wanted]:
            try:
                self.detach(Cgroup(path))
            except OSError as e:
                errors[path] = f"cannot detach {self.spec.name} from cgroup {path}: {e.strerror or e}"
        for path, cgroup in wanted.items():
            if path in self.cgroups:
                continue
            try:
                self.attach(cgroup)
            except (HookError, CgroupError) as e:
                errors[path] = str(e)
        return errors

    def detach_all(self) -> None:
        for path in list(self.cgroups):
            self.detach(Cgroup(path))

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
                self._functions.clear()

    def stop(self) -> None:
        try:
            self.detach_all()
        finally:
            self.close()

    def _unpin(self) -> None:
        if not self.pin_dir.is_dir():
            return
        for path in self.pin_dir.iterdir():
            _unlink(path)
        self.pin_dir.rmdir()


def sweep(spec: HookSet, cgroups: Iterable[Cgroup]) -> list[Path]:
    """Detach meshlet programs of the set's cgroup hook types from these cgroups (whatever
    agent attached them); the cgroups that had one."""
    swept = []
    for cgroup in cgroups:
        try:
            fd = os.open(cgroup.path, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            continue
        try:
            found = False
            for hook in spec.cgroup_hooks:
                for prog_id in bpfsys.attached_ids(fd, hook.attach_type):
                    found |= _detach_if_ours(prog_id, fd, hook.attach_type)
            if found:
                swept.append(cgroup.path)
        finally:
            os.close(fd)
    return swept


def _detach_if_ours(prog_id: int, cgroup_fd: int, attach_type: int) -> bool:
    try:
        prog_fd = bpfsys.prog_fd_by_id(prog_id)
    except FileNotFoundError:
        return False  # freed meanwhile
    try:
        if not bpfsys.prog_info(prog_fd).name.startswith(PROGRAM_PREFIX):
            return False
        with contextlib.suppress(FileNotFoundError):
            bpfsys.detach(prog_fd, cgroup_fd, attach_type)
        return True
    finally:
        os.close(prog_fd)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
