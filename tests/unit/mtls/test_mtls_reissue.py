"""Local mode's self-reissue: when a certificate is due, what replaces it, and who may issue it."""

from __future__ import annotations

import datetime as dt

import pytest
from mtls_support import FRONTEND, NOW, authority, workload

from meshlet.mtls.ca import BACKDATE
from meshlet.mtls.files import IdentityError, read_identity, write_authority, write_identity
from meshlet.mtls.reissue import Reissuer, lifetime, renew_at

HOUR = dt.timedelta(hours=1)


@pytest.fixture
def dirs(tmp_path):
    write_authority(tmp_path / "ca", authority())
    write_identity(tmp_path / "id", workload(FRONTEND, issued_at=NOW, ttl=3600), authority().cert)
    return tmp_path / "id", tmp_path / "ca"


def test_renewal_is_due_halfway_through_the_issued_lifetime():
    cert = workload(issued_at=NOW, ttl=3600).cert
    assert cert.not_valid_before_utc == NOW - BACKDATE  # backdated for skew, which is not lifetime
    assert lifetime(cert) == HOUR
    assert renew_at(cert) == NOW + HOUR / 2
    assert renew_at(cert, 0.8) == NOW + HOUR * 0.8


def test_not_due_leaves_the_identity_alone(dirs):
    identity, ca = dirs
    before = read_identity(identity).serial
    assert Reissuer(identity, ca).reissue_if_due(NOW + HOUR / 4) is None
    assert read_identity(identity).serial == before


def test_due_reissues_the_same_identity_for_the_same_lifetime(dirs):
    identity, ca = dirs
    old = read_identity(identity)
    later = NOW + HOUR * 0.6
    issued = Reissuer(identity, ca).reissue_if_due(later)
    assert issued is not None
    new = read_identity(identity)  # cert, key and bundle on disk belong together
    assert new.serial != old.serial and new.spiffe_id == FRONTEND
    assert new.cert.not_valid_after_utc == later + HOUR
    assert new.bundle == (authority().cert,)
    assert (identity / "key.pem").stat().st_mode & 0o777 == 0o600
    assert Reissuer(identity, ca).reissue_if_due(later) is None  # a second worker finds it renewed


def test_a_ca_the_identity_does_not_trust_is_refused(dirs, tmp_path):
    identity, _ = dirs
    write_authority(tmp_path / "other", authority("other"))
    with pytest.raises(IdentityError, match=r"this CA is not in .*ca\.pem"):
        Reissuer(identity, tmp_path / "other")
    with pytest.raises(IdentityError, match=r"cannot read .*missing/ca\.pem: No such file"):
        Reissuer(identity, tmp_path / "missing")
