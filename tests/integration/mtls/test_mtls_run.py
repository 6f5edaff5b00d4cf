"""`meshlet run --identity` as users start it: a bad identity dir, and mTLS with several workers."""

from __future__ import annotations

import datetime as dt
import http.client
import socket
import ssl
import subprocess
import time

from cryptography import x509
from mesh_support import (
    FRONTEND,
    MESHLET,
    REVIEWS,
    EchoApp,
    admin,
    http_get,
    https_get,
    make_mesh,
    now,
    run_sidecar,
    tls_context,
    traffic_policy,
)
from prometheus_client.parser import text_string_to_metric_families

from meshlet.mtls.files import read_identity, write_authority

STRICT = traffic_policy("self", "self", "127.0.0.1:9", mode="STRICT", allow=(FRONTEND,))


def test_unusable_identity_dir_is_one_line_and_exit_1(tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text(STRICT)
    result = subprocess.run([MESHLET, "run", "--policy", str(policy), "--identity", str(tmp_path / "none"),
                             "--outbound", "127.0.0.1:0", "--inbound", "127.0.0.1:0", "--admin", "127.0.0.1:0"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr == f"meshlet: cannot read {tmp_path / 'none' / 'cert.pem'}: No such file or directory\n"


def test_strict_mtls_with_two_workers(tmp_path):
    mesh = make_mesh(tmp_path)
    server, frontend = mesh.identity("server", REVIEWS), mesh.identity("frontend", FRONTEND)
    app = EchoApp()
    try:
        with run_sidecar(STRICT, "--identity", str(server), app_port=app.port, workers=2) as sidecar:
            for _ in range(6):  # connections spread over both workers
                assert https_get(sidecar.inbound, tls_context(frontend, server)) == (200, f"app {FRONTEND}\n")
            status, certs = admin(sidecar, "GET", "/certs")
            assert status == 200
            assert (certs["identity"], certs["serial"]) == (REVIEWS, read_identity(server).serial)
            _, text = admin(sidecar, "GET", "/metrics")
            ok = sum(s.value for f in text_string_to_metric_families(text) if f.name == "meshlet_mtls_handshakes"
                     for s in f.samples if s.name.endswith("_total") and s.labels == {"direction": "inbound", "result": "ok"})
            assert ok == 6
            assert "Traceback" not in sidecar.stderr()
    finally:
        app.close()


def test_policy_needing_mtls_refused_at_start_without_identity(tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text(STRICT)
    result = subprocess.run([MESHLET, "run", "--policy", str(policy),
                             "--outbound", "127.0.0.1:0", "--inbound", "127.0.0.1:0", "--admin", "127.0.0.1:0"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith(f"meshlet: {policy}:11:9: mtls.mode STRICT needs a mesh identity, but the sidecar ")
    assert result.stderr.count("\n") == 1 and "--identity DIR" in result.stderr and "Traceback" not in result.stderr


def test_put_policy_needing_mtls_is_400_and_keeps_the_table_without_identity(tmp_path):
    permissive = traffic_policy("self", "self", "127.0.0.1:9", mode="PERMISSIVE")
    app = EchoApp()
    try:
        with run_sidecar(permissive, app_port=app.port) as sidecar:  # no --identity
            for wanted in (STRICT, traffic_policy("reviews", "reviews", "127.0.0.1:9", tls="mesh", identity=REVIEWS)):
                status, body = admin(sidecar, "PUT", "/policy", wanted.encode())
                assert status == 400
                assert len(body["errors"]) == 1 and "needs a mesh identity" in body["errors"][0]
                assert body["errors"][0].startswith("policy:")
            status, body = admin(sidecar, "GET", "/policy")
            assert (status, body["generation"], body["policy"]) == (200, 1, permissive)
            assert http_get(sidecar.inbound) == (200, "app -\n")  # plaintext inbound still served
    finally:
        app.close()


def peer_serial(sock: ssl.SSLSocket) -> str:
    der = sock.getpeercert(binary_form=True)
    assert der is not None
    return f"{x509.load_der_x509_certificate(der).serial_number:x}"


def test_local_mode_reissues_before_expiry_without_dropping_a_keep_alive_connection(tmp_path):
    mesh = make_mesh(tmp_path)
    write_authority(tmp_path / "ca", mesh.ca)
    # 60 s certificate, 20 s old: due for renewal (half its lifetime) about 10 s from now.
    server = mesh.identity("server", REVIEWS, issued_at=now() - dt.timedelta(seconds=20), ttl=60)
    old = read_identity(server)
    ctx = tls_context(mesh.identity("frontend", FRONTEND), server)
    app = EchoApp()
    try:
        with run_sidecar(STRICT, "--identity", str(server), "--ca", str(tmp_path / "ca"), app_port=app.port) as sidecar:
            kept = http.client.HTTPSConnection(*sidecar.inbound, context=ctx, timeout=10)
            try:
                kept.request("GET", "/", headers={"Host": "app"})
                assert kept.getresponse().read() == f"app {FRONTEND}\n".encode()
                sock = kept.sock
                assert peer_serial(sock) == old.serial  # established with the certificate about to be replaced
                deadline = time.monotonic() + 40
                while admin(sidecar, "GET", "/certs")[1]["serial"] == old.serial:
                    assert time.monotonic() < deadline, "the sidecar did not reissue its certificate"
                    time.sleep(0.2)
                new = read_identity(server)
                assert new.serial != old.serial and new.spiffe_id == REVIEWS and new.not_after > old.not_after
                kept.request("GET", "/", headers={"Host": "app"})  # the same connection, still open
                assert kept.getresponse().read() == f"app {FRONTEND}\n".encode()
                assert kept.sock is sock
            finally:
                kept.close()
            with socket.create_connection(sidecar.inbound, timeout=10) as raw, ctx.wrap_socket(raw) as fresh:
                assert peer_serial(fresh) == new.serial
            assert "Traceback" not in sidecar.stderr()
    finally:
        app.close()


def test_ca_without_identity_is_one_line_and_exit_1(tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text(traffic_policy("self", "self", "127.0.0.1:9"))
    result = subprocess.run([MESHLET, "run", "--policy", str(policy), "--ca", str(tmp_path),
                             "--outbound", "127.0.0.1:0", "--inbound", "127.0.0.1:0", "--admin", "127.0.0.1:0"],
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (1, "meshlet: --ca reissues the --identity certificate: give --identity DIR too\n")
