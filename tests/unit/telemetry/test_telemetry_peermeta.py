"""Peer metadata: what a sidecar believes about the other side of a hop, and what it never does."""

from __future__ import annotations

import pytest

from meshlet.policy.model import Address, Backend
from meshlet.proxy.peermeta import declared, decode, encode, spiffe_namespace, trusted
from meshlet.telemetry.outcome import Workload

PRINCIPAL = "spiffe://cluster.local/ns/books/sa/reviews"


def test_round_trip_carries_workload_and_service():
    me = Workload("reviews-v2", "books", "spiffe://ignored", "reviews", "v2")
    value = encode(me, "reviews.books.svc.cluster.local")
    assert b"spiffe" not in value  # the principal is the certificate's to say
    workload, service = decode(value)
    assert (workload.workload, workload.namespace, workload.app, workload.version) == ("reviews-v2", "books", "reviews", "v2")
    assert workload.principal == "unknown" and service == "reviews.books.svc.cluster.local"


def test_unknown_values_are_not_sent():
    assert encode(Workload()) == b""
    assert decode(b"") == (Workload(), "unknown")


@pytest.mark.parametrize("value", [
    b"workload=a b", b"workload", b"workload=" + b"x" * 64, b"app=a;version=\xff", b"x=" * 300,
    b"workload=a\r\nx-injected: 1",
])
def test_malformed_values_are_refused_whole(value):
    assert decode(value) is None


def test_unknown_keys_are_ignored_including_a_claimed_principal():
    workload, _ = decode(b"workload=w;principal=spiffe://evil/ns/x/sa/y;future=1")
    assert workload == Workload(workload="w")


def test_nothing_is_believed_without_a_verified_principal():
    assert trusted(decode(b"workload=w;namespace=books"), None) == (Workload(), "unknown")


def test_a_verified_peer_adds_names_to_its_certificate():
    peer, service = trusted(decode(b"workload=reviews-v2;namespace=books;app=reviews;version=v2;service=reviews"),
                            PRINCIPAL)
    assert peer == Workload("reviews-v2", "books", PRINCIPAL, "reviews", "v2") and service == "reviews"


def test_metadata_claiming_another_namespace_than_the_certificate_is_dropped():
    peer, service = trusted(decode(b"workload=payments;namespace=bank;service=payments"), PRINCIPAL)
    assert peer == Workload(namespace="books", principal=PRINCIPAL) and service == "unknown"


def test_spiffe_namespace():
    assert spiffe_namespace(PRINCIPAL) == "books"
    assert spiffe_namespace("spiffe://example.org/workload") is None


def test_a_backend_declares_what_it_is():
    address = Address("10.0.0.1", 80)
    assert declared(Backend("v2", address, workload="reviews-v2", version="v2")) == \
        Workload("reviews-v2", "unknown", "unknown", "reviews-v2", "v2")
    assert declared(Backend("v2", address, tls="mesh", identity=PRINCIPAL)).principal == PRINCIPAL
    assert declared(Backend("v2", address)) == Workload()
