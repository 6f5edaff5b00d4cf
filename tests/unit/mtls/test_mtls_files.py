"""Identity dirs on disk, the rotation watcher, and `meshlet ca` / `meshlet cert` as users run them."""

from __future__ import annotations

import contextlib
import datetime as dt
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from mtls_support import FRONTEND, REVIEWS, authority, workload
from OpenSSL import SSL, crypto

from meshlet.mtls.contexts import build_contexts
from meshlet.mtls.files import (
    IdentityError,
    key_pem,
    read_authority,
    read_identity,
    write_authority,
    write_identity,
)
from meshlet.mtls.rotation import IdentityWatcher
from meshlet.mtls.verify import verify_peer

MESHLET = Path(sys.executable).parent / "meshlet"


def meshlet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(MESHLET), *args], capture_output=True, text=True, timeout=60)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_identity_round_trips_with_private_key_0600(tmp_path):
    write_identity(tmp_path, workload(FRONTEND), authority().cert)
    identity = read_identity(tmp_path)
    assert identity.spiffe_id == FRONTEND
    assert identity.bundle == (authority().cert,)
    assert mode(tmp_path / "key.pem") == 0o600
    assert not list(tmp_path.glob(".*.tmp"))


def test_mismatched_key_is_refused_naming_the_file(tmp_path):
    write_identity(tmp_path, workload(FRONTEND), authority().cert)
    other = tmp_path / "other"
    write_identity(other, workload(REVIEWS), authority().cert)
    (tmp_path / "key.pem").write_bytes((other / "key.pem").read_bytes())
    with pytest.raises(IdentityError, match=r"key\.pem: key does not match .*cert\.pem"):
        read_identity(tmp_path)


def test_missing_and_garbage_files_are_named(tmp_path):
    with pytest.raises(IdentityError, match=r"cannot read .*cert\.pem: No such file"):
        read_identity(tmp_path)
    write_identity(tmp_path, workload(FRONTEND), authority().cert)
    (tmp_path / "ca.pem").write_text("hello\n")
    with pytest.raises(IdentityError, match=r"ca\.pem: not a PEM certificate"):
        read_identity(tmp_path)


def test_ca_is_never_overwritten(tmp_path):
    write_authority(tmp_path, authority())
    assert mode(tmp_path / "ca-key.pem") == 0o600
    assert read_authority(tmp_path).cert == authority().cert
    with pytest.raises(IdentityError, match="already holds a CA"):
        write_authority(tmp_path, authority("other"))
    assert read_authority(tmp_path).cert == authority().cert


def test_watcher_swaps_on_change_and_keeps_the_old_identity_on_a_broken_dir(tmp_path):
    write_identity(tmp_path, workload(FRONTEND), authority().cert)
    watcher = IdentityWatcher(tmp_path)
    first = watcher.current
    assert watcher.ready() and watcher.describe()["dir"] == str(tmp_path)
    assert not watcher.poll()  # nothing changed

    (tmp_path / "cert.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\ntruncated")  # mid-rotation
    assert not watcher.poll()
    assert watcher.current is first and watcher.reload_failures == 1

    write_identity(tmp_path, workload(REVIEWS), authority().cert)
    assert watcher.poll()
    assert watcher.current.identity.spiffe_id == REVIEWS
    assert watcher.describe()["serial"] == watcher.current.identity.serial != first.identity.serial


def test_watcher_refuses_to_start_without_an_identity(tmp_path):
    with pytest.raises(IdentityError, match=r"cert\.pem"):
        IdentityWatcher(tmp_path)


# --- the commands, through the installed entry point ----------------------------------------

def test_ca_init_and_cert_issue(tmp_path):
    ca, out = tmp_path / "ca", tmp_path / "frontend"
    result = meshlet("ca", "init", "--dir", str(ca))
    assert result.returncode == 0, result.stderr
    assert mode(ca / "ca-key.pem") == 0o600
    result = meshlet("cert", "issue", "--ca", str(ca), "--spiffe", FRONTEND, "--out", str(out), "--ttl", "90m")
    assert result.returncode == 0, result.stderr
    assert FRONTEND in result.stdout
    identity = read_identity(out)
    assert identity.spiffe_id == FRONTEND
    assert identity.bundle[0] == read_authority(ca).cert
    assert (identity.not_after - identity.cert.not_valid_before_utc).total_seconds() == 90 * 60 + 300
    assert mode(out / "key.pem") == 0o600
    identity.cert.verify_directly_issued_by(read_authority(ca).cert)
    assert isinstance(identity.cert, x509.Certificate)


def test_ca_init_twice_is_one_line_error(tmp_path):
    assert meshlet("ca", "init", "--dir", str(tmp_path)).returncode == 0
    before = (tmp_path / "ca.pem").read_bytes()
    result = meshlet("ca", "init", "--dir", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr == f"meshlet: {tmp_path} already holds a CA (ca.pem); refusing to overwrite it\n"
    assert (tmp_path / "ca.pem").read_bytes() == before


@pytest.mark.parametrize(("args", "message"), [
    (["--spiffe", "spiffe://cluster.local/"], "meshlet: bad SPIFFE ID 'spiffe://cluster.local/'"),
    (["--spiffe", FRONTEND, "--ttl", "24"], "meshlet: bad duration '24'"),
    (["--spiffe", FRONTEND, "--ca", "/nonexistent"], "meshlet: cannot read /nonexistent/ca.pem: No such file"),
])
def test_cert_issue_user_errors(tmp_path, args, message):
    ca = tmp_path / "ca"
    assert meshlet("ca", "init", "--dir", str(ca)).returncode == 0
    result = meshlet("cert", "issue", "--ca", str(ca), "--out", str(tmp_path / "id"), *args)
    assert result.returncode == 1
    assert result.stderr.startswith(message)
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "id").exists()


# --- identity dirs written by other issuers --------------------------------------------------

def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _spire_chain() -> tuple[x509.Certificate, x509.Certificate, object]:
    """A root that may sign one level of CAs, an intermediate (as SPIRE's server CA is), and the
    key of a leaf the intermediate signs: what spiffe-helper writes."""
    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def cert(subject, issuer, public, signer, ca: bool, san=None):
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public)
                   .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
                   .not_valid_after(now + dt.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=1 if ca else None), critical=True))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(san)]),
                                            critical=True)
        return builder.sign(signer, hashes.SHA256())

    now = dt.datetime.now(dt.UTC)  # OpenSSL checks the dates against the clock in the handshake below
    root_key, mid_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root = cert(name("spire root"), name("spire root"), root_key.public_key(), root_key, True)
    mid = cert(name("spire server CA"), root.subject, mid_key.public_key(), root_key, True)
    leaf = cert(x509.Name([]), mid.subject, leaf_key.public_key(), mid_key, False, FRONTEND)
    return root, mid, (leaf, leaf_key)


def test_csi_driver_spiffe_files_are_read_and_followed(tmp_path):
    issued = workload(FRONTEND)
    files = {"tls.crt": _pem(issued.cert), "tls.key": key_pem(issued.key), "ca.crt": _pem(authority().cert)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    watcher = IdentityWatcher(tmp_path)
    assert watcher.current.identity.spiffe_id == FRONTEND
    renewed = workload(REVIEWS)  # cert-manager renews: the driver rewrites the volume
    (tmp_path / "tls.key").write_bytes(key_pem(renewed.key))
    (tmp_path / "tls.crt").write_bytes(_pem(renewed.cert))
    assert watcher.poll()
    assert watcher.current.identity.serial == f"{renewed.cert.serial_number:x}"


def test_spiffe_helper_files_with_an_intermediate_are_presented_as_a_chain(tmp_path):
    root, mid, (leaf, leaf_key) = _spire_chain()
    (tmp_path / "svid.pem").write_bytes(_pem(leaf, mid))
    (tmp_path / "svid_key.pem").write_bytes(key_pem(leaf_key))
    (tmp_path / "svid_bundle.pem").write_bytes(_pem(root))
    identity = read_identity(tmp_path)
    assert (identity.spiffe_id, identity.chain, identity.bundle) == (FRONTEND, (mid,), (root,))
    assert verify_peer([identity.cert, *identity.chain], identity.bundle, dt.datetime.now(dt.UTC)).ok
    # A real handshake (memory BIOs): the server sends leaf + intermediate, so a client that holds
    # only the root builds the path.
    server = SSL.Connection(build_contexts(identity).server)
    server.set_accept_state()
    client_ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    client_ctx.get_cert_store().add_cert(crypto.X509.from_cryptography(root))
    client_ctx.set_verify(SSL.VERIFY_PEER, lambda *args: bool(args[-1]))
    client = SSL.Connection(client_ctx)
    client.set_connect_state()
    for _ in range(10):
        for a, b in ((client, server), (server, client)):
            with contextlib.suppress(SSL.WantReadError):
                a.do_handshake()
            with contextlib.suppress(SSL.WantReadError):
                b.bio_write(a.bio_read(65536))
    assert [c.to_cryptography() for c in client.get_peer_cert_chain()][:2] == [leaf, mid]


def test_an_identity_dir_with_no_known_layout_names_meshlets_own_file(tmp_path):
    (tmp_path / "tls.key").write_bytes(b"")
    with pytest.raises(IdentityError, match=r"cannot read .*/cert\.pem"):
        read_identity(tmp_path)
