"""The log-linear histogram the kernel programs fill, seen from Python.

One definition of the bucket arithmetic: `SUB_BITS` and `MAX_EXP` reach the C side
(`bpf/meshlet_hist.h`) as `-D` flags, and `slot_of` mirrors the C `hist_slot` bit for bit,
so the Prometheus bucket bounds are exactly the kernel's. Values are integer microseconds.
"""

from __future__ import annotations

SUB_BITS = 2  # 4 slots per power of two: a slot is at most 25% wide
MAX_EXP = 26  # values up to 2^27 µs (about 134 s) get their own slot
SUB = 1 << SUB_BITS
SLOTS = (MAX_EXP - SUB_BITS + 2) * SUB
SLOT_SUM = SLOTS  # the map slot holding the sum of values


def cflags() -> list[str]:
    return [f"-DHIST_SUB_BITS={SUB_BITS}", f"-DHIST_MAX_EXP={MAX_EXP}"]


def slot_of(value_us: int) -> int:
    """The slot the C `hist_slot` puts `value_us` in."""
    if value_us < SUB:
        return value_us
    e = value_us.bit_length() - 1
    if e > MAX_EXP:
        return SLOTS - 1
    m = (value_us >> (e - SUB_BITS)) & (SUB - 1)
    return (e - SUB_BITS + 1) * SUB + m


def lower_us(slot: int) -> int:
    """Smallest value in `slot` (inclusive)."""
    if slot < SUB:
        return slot
    e = slot // SUB + SUB_BITS - 1
    m = slot % SUB
    return (SUB + m) << (e - SUB_BITS)


def upper_us(slot: int) -> int | None:
    """Exclusive upper end of `slot`; None for the last slot, which is open-ended."""
    return None if slot >= SLOTS - 1 else lower_us(slot + 1)


def bounds_seconds() -> tuple[float, ...]:
    """Prometheus `le` bounds of every slot but the last (+Inf).

    A kernel value is a truncated microsecond count, so "slot < upper" on the truncated
    value is exactly "real value < upper µs": the bound holds for the real duration too.
    """
    return tuple(lower_us(slot + 1) / 1e6 for slot in range(SLOTS - 1))
