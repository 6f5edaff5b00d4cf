"""The Python side of the kernel histogram's bucket arithmetic (the C side is checked against
it in tests/integration/ebpf/test_ebpf_hist_kernel.py)."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from meshlet.ebpf import hist


def test_small_values_have_exact_slots_then_four_per_power_of_two():
    assert [hist.slot_of(v) for v in range(8)] == list(range(8))
    assert [hist.slot_of(v) for v in (8, 9, 10, 11, 12, 14, 15, 16)] == [8, 8, 9, 9, 10, 11, 11, 12]
    assert [hist.lower_us(s) for s in range(8, 13)] == [8, 10, 12, 14, 16]


@given(st.integers(min_value=0, max_value=(1 << (hist.MAX_EXP + 1)) - 1))
def test_every_value_lies_in_its_slot(value):
    slot = hist.slot_of(value)
    assert hist.lower_us(slot) <= value
    upper = hist.upper_us(slot)
    assert upper is None or value < upper


def test_slots_are_contiguous_and_at_most_25_percent_wide():
    for slot in range(hist.SLOTS - 1):
        lower, upper = hist.lower_us(slot), hist.upper_us(slot)
        assert upper == hist.lower_us(slot + 1) > lower
        assert upper - lower <= max(1, lower // 4)


def test_huge_values_share_the_open_last_slot():
    assert hist.slot_of(1 << (hist.MAX_EXP + 1)) == hist.SLOTS - 1
    assert hist.slot_of(1 << 60) == hist.SLOTS - 1
    assert hist.upper_us(hist.SLOTS - 1) is None


def test_prometheus_bounds_are_the_slot_upper_ends_in_seconds():
    bounds = hist.bounds_seconds()
    assert len(bounds) == hist.SLOTS - 1
    assert bounds[:4] == (1e-6, 2e-6, 3e-6, 4e-6)
    assert all(a < b for a, b in itertools.pairwise(bounds))


def test_c_gets_its_constants_from_python():
    assert hist.cflags() == [f"-DHIST_SUB_BITS={hist.SUB_BITS}", f"-DHIST_MAX_EXP={hist.MAX_EXP}"]
    assert hist.SUB >= 4  # the issue asks for at least 4 sub-buckets per power of two
