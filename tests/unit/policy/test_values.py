from __future__ import annotations

import pytest

from meshlet.policy.model import Address
from meshlet.policy.values import parse_address, parse_duration, parse_rate, parse_spiffe_id


@pytest.mark.parametrize("text, bits", [
    ("50mbit", 50_000_000), ("500kbit", 500_000), ("1gbit", 10**9), ("1000", 1000), ("1.5mbit", 1_500_000),
    ("10mbps", 80_000_000), ("8bps", 64), ("100Mbit", 100_000_000),
])
def test_rates_use_tc_units(text, bits):
    assert parse_rate(text) == bits


@pytest.mark.parametrize("text", ["fast", "10 mbits", "-5mbit", "0mbit", ""])
def test_bad_rates(text):
    with pytest.raises(ValueError, match="bad rate"):
        parse_rate(text)


@pytest.mark.parametrize("text, address", [
    ("127.0.0.1:9081", Address("127.0.0.1", 9081)),
    ("[::1]:80", Address("::1", 80)),
    ("reviews-v1.default.svc.cluster.local:9080", Address("reviews-v1.default.svc.cluster.local", 9080)),
])
def test_addresses(text, address):
    assert parse_address(text) == address
    assert str(address) == text


def test_duration_rejects_bare_numbers():
    with pytest.raises(ValueError, match="expected a number with a unit"):
        parse_duration("30")


@pytest.mark.parametrize("text", [
    "spiffe://cluster.local/ns/default/sa/reviews", "spiffe://example.org/workload-1",
])
def test_good_spiffe_ids(text):
    assert parse_spiffe_id(text) == text


@pytest.mark.parametrize("text", [
    "spiffe://cluster.local", "spiffe://cluster.local/", "spiffe://Cluster.local/x", "https://cluster.local/x",
    "spiffe://cluster.local/ns/../sa", "spiffe://cluster.local/a b", "",
])
def test_bad_spiffe_ids(text):
    with pytest.raises(ValueError, match="bad SPIFFE ID"):
        parse_spiffe_id(text)
