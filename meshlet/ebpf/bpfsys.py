"""The few bpf() object operations bcc 0.26 does not wrap, through the system libbpf.

Opening pinned objects, asking a cgroup which programs it runs, a program's id and miss count, detaching by
file descriptor, and walking the keys of a map bcc cannot wrap (a sockhash). Errors come back
as `OSError` with the errno. (Pinning itself is `meshlet.ebpf.pins.pin`.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path


@cache
def _libbpf() -> ctypes.CDLL:
    lib = ctypes.CDLL(ctypes.util.find_library("bpf") or "libbpf.so.1", use_errno=True)
    c_int, c_uint, c_char_p, c_void_p = ctypes.c_int, ctypes.c_uint, ctypes.c_char_p, ctypes.c_void_p
    signatures = {
        "bpf_obj_get": (c_int, [c_char_p]),
        "bpf_prog_get_fd_by_id": (c_int, [c_uint]),
        "bpf_prog_detach2": (c_int, [c_int, c_int, c_int]),
        "bpf_prog_query": (
            c_int,
            [c_int, c_int, c_uint, ctypes.POINTER(c_uint), ctypes.POINTER(c_uint), ctypes.POINTER(c_uint)],
        ),
        "bpf_map_get_next_key": (c_int, [c_int, c_void_p, c_void_p]),
        "bpf_obj_get_info_by_fd": (c_int, [c_int, c_void_p, ctypes.POINTER(c_uint)]),
    }
    for name, (restype, argtypes) in signatures.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, argtypes
    return lib


def _check(result: int, what: str) -> int:
    if result < 0:
        code = -result if result != -1 else ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return result


def open_pinned(path: Path) -> int:
    """A new file descriptor for the object pinned at `path`; the caller closes it."""
    return _check(_libbpf().bpf_obj_get(os.fsencode(path)), f"open {path}")


def prog_fd_by_id(prog_id: int) -> int:
    """A new file descriptor for a loaded program (FileNotFoundError: freed); the caller closes it."""
    return _check(_libbpf().bpf_prog_get_fd_by_id(prog_id), f"program {prog_id}")


def detach(prog_fd: int, target_fd: int, attach_type: int) -> None:
    _check(_libbpf().bpf_prog_detach2(prog_fd, target_fd, attach_type), f"detach type {attach_type}")


@dataclass(frozen=True, slots=True)
class ProgInfo:
    """What the kernel tells about a loaded program. `recursion_misses` counts the runs it skipped
    because another tracing program was already running on that CPU (a softirq landing on top of
    one, say): events the program never saw, so its counts are short by exactly that much."""

    id: int
    run_count: int  # only counted while the kernel.bpf_stats_enabled sysctl is 1
    recursion_misses: int
    name: str = ""  # the function's name, cut to 15 characters


# Offsets in struct bpf_prog_info (linux/bpf.h): id at 4, name[16] at 64, run_cnt at 200,
# recursion_misses at 208.
_PROG_INFO_SIZE = 232


def prog_info(fd: int) -> ProgInfo:
    info = ctypes.create_string_buffer(_PROG_INFO_SIZE)  # zeroed beyond what the kernel fills, as it requires
    size = ctypes.c_uint(ctypes.sizeof(info))
    _check(_libbpf().bpf_obj_get_info_by_fd(fd, info, ctypes.byref(size)), "program info")
    run_count, misses = struct.unpack_from("<QQ", info.raw, 200)
    name = info.raw[64:80].split(b"\0", 1)[0].decode(errors="replace")
    return ProgInfo(int.from_bytes(info.raw[4:8], "little"), run_count, misses, name)


def prog_id(fd: int) -> int:
    """The kernel's id of a loaded program."""
    return prog_info(fd).id


def attached_ids(target_fd: int, attach_type: int, capacity: int = 64) -> tuple[int, ...]:
    """Ids of the programs of `attach_type` attached directly to a cgroup (or map) fd."""
    ids = (ctypes.c_uint * capacity)()
    count = ctypes.c_uint(capacity)
    flags = ctypes.c_uint(0)
    _check(
        _libbpf().bpf_prog_query(target_fd, attach_type, 0, ctypes.byref(flags), ids, ctypes.byref(count)),
        f"query type {attach_type}",
    )
    return tuple(ids[: count.value])


def map_keys(fd: int, key_size: int, limit: int) -> Iterator[bytes]:
    """The keys of a map, at most `limit` of them (a bound, in case the map churns while we walk)."""
    lib = _libbpf()
    key = ctypes.create_string_buffer(key_size)
    following = ctypes.create_string_buffer(key_size)
    current = None
    for _ in range(limit):
        if lib.bpf_map_get_next_key(fd, current, following) != 0:
            return
        yield following.raw
        ctypes.memmove(key, following, key_size)
        current = key
