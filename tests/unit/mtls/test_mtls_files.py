"""Identity dirs on disk, the rotation watcher, and `meshlet ca` / `meshlet cert` as users run them."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from mtls_support import FRONTEND, REVIEWS, authority, workload

from meshlet.mtls.files import IdentityError, read_authority, read_identity, write_authority, write_identity
from meshlet.mtls.rotation import IdentityWatcher

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
    seen = []
    watcher = IdentityWatcher(tmp_path, on_change=lambda c: seen.append(c.identity.serial))
    first = watcher.current
    assert not watcher.poll()  # nothing changed

    (tmp_path / "cert.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\ntruncated")  # mid-rotation
    assert not watcher.poll()
    assert watcher.current is first and watcher.reload_failures == 1

    write_identity(tmp_path, workload(REVIEWS), authority().cert)
    assert watcher.poll()
    assert watcher.current.identity.spiffe_id == REVIEWS
    assert seen == [first.identity.serial, watcher.current.identity.serial]


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
