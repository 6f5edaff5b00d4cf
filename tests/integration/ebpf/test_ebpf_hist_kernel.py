"""The C bucket arithmetic of bpf/meshlet_hist.h, run in the kernel with BPF_PROG_TEST_RUN,
against meshlet.ebpf.hist.slot_of on the same values."""

from __future__ import annotations

import ctypes
import random
import struct

import pytest

from meshlet.ebpf import hist, source

pytestmark = pytest.mark.root

PROGRAM = b"""
int slot_of(struct __sk_buff *skb)
{
    u64 value;
    if (bpf_skb_load_bytes(skb, 14, &value, sizeof(value)) < 0)
        return -1;
    return hist_slot(value);
}
"""

_BPF_PROG_TEST_RUN = 10
_SYS_BPF = 321


class _TestRunAttr(ctypes.Structure):
    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64),
        ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32),
        ("duration", ctypes.c_uint32),
        ("pad", ctypes.c_uint8 * 64),
    ]


def kernel_slot(prog_fd: int, value: int) -> int:
    packet = ctypes.create_string_buffer(b"\0" * 14 + struct.pack("<Q", value) + b"\0" * 40)
    attr = _TestRunAttr(prog_fd=prog_fd, data_size_in=len(packet.raw), data_in=ctypes.addressof(packet), repeat=1)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(_SYS_BPF, _BPF_PROG_TEST_RUN, ctypes.byref(attr), ctypes.sizeof(attr)) != 0:
        raise OSError(ctypes.get_errno(), "BPF_PROG_TEST_RUN")
    return attr.retval


def test_c_and_python_slots_agree():
    from bcc import BPF

    bpf = BPF(text=source.translation_unit(source.HEADER) + PROGRAM, cflags=[*hist.cflags(), *source.include_flags()])
    try:
        fd = bpf.load_func(b"slot_of", BPF.SCHED_CLS).fd
        rng = random.Random(1)
        edges = [v for e in range(40) for v in ((1 << e) - 1, 1 << e, (1 << e) + 1)]
        values = [*range(0, 300), *edges, *(rng.getrandbits(rng.randint(1, 40)) for _ in range(500))]
        mismatched = [(v, kernel_slot(fd, v), hist.slot_of(v)) for v in values if kernel_slot(fd, v) != hist.slot_of(v)]
        assert mismatched == []
    finally:
        bpf.cleanup()
