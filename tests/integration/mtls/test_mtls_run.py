"""`meshlet run --identity` as users start it: a bad identity dir, and mTLS with several workers."""

from __future__ import annotations

import subprocess

from mesh_support import (
    FRONTEND,
    MESHLET,
    REVIEWS,
    EchoApp,
    admin,
    http_get,
    https_get,
    make_mesh,
    run_sidecar,
    tls_context,
    traffic_policy,
)
from prometheus_client.parser import text_string_to_metric_families

from meshlet.mtls.files import read_identity

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


def test_mesh_backend_without_identity_fails_closed_and_says_why(tmp_path):
    mesh = make_mesh(tmp_path)
    server = mesh.identity("server", REVIEWS)
    app = EchoApp()
    try:
        with run_sidecar(STRICT, "--identity", str(server), app_port=app.port) as b:
            to_b = traffic_policy("reviews", "reviews", f"127.0.0.1:{b.inbound[1]}", tls="mesh", identity=REVIEWS)
            with run_sidecar(to_b) as a:  # no --identity
                status, body = http_get(a.outbound, host="reviews")
                assert status == 502
                assert "app" not in body
                assert "needs mesh mTLS but the sidecar runs without --identity" in a.stderr()
    finally:
        app.close()
