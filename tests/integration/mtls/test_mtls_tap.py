"""`meshlet tap` shows the SPIFFE ID that inbound mTLS verified, per request (both engines)."""

from __future__ import annotations

import pytest
from mesh_support import (
    FRONTEND,
    REVIEWS,
    EchoApp,
    Tap,
    https_get,
    make_mesh,
    run_sidecar,
    tls_context,
    traffic_policy,
)

pytestmark = pytest.mark.timeout(120)


def test_inbound_tap_lines_carry_the_verified_peer_identity(tmp_path):
    mesh = make_mesh(tmp_path)
    mesh.identity("server", REVIEWS)
    mesh.identity("frontend", FRONTEND)
    client = tls_context(mesh.root / "frontend", mesh.root / "server")
    strict = traffic_policy("self", "self", "127.0.0.1:9", mode="STRICT", allow=(FRONTEND,))
    app = EchoApp()
    try:
        with run_sidecar(strict, "--identity", str(mesh.root / "server"),
                         app_port=app.port) as sidecar:
            tap = Tap(sidecar)
            try:
                tap.attach(lambda request_id: https_get(sidecar.inbound, client, {"x-request-id": request_id}))
                status, _ = https_get(sidecar.inbound, client, {"x-request-id": "from-frontend"}, path="/who")
                [line] = tap.wait_for(["from-frontend"])
            finally:
                code, err = tap.stop()
            assert status == 200 and code == 0, err
            assert line.endswith(f" GET app/who  route=inbound backend=app peer={FRONTEND} id=from-frontend"), line
    finally:
        app.close()
