"""Sidecars that get their certificates from `meshlet identity serve`, end to end.

app client ──http──► sidecar A (sa/frontend) ══mTLS══► sidecar B (sa/reviews, STRICT) ──http──► echo app

Keys stay in each sidecar process; certificates are short (seconds) so renewals and a CA
rotation happen while traffic flows, and not one request may fail. TokenReviews go to the fake
API server (identity_support), which stands in for kube-apiserver. The engine is a parameter:
every test here must hold for each engine that serves requests.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from cryptography import x509
from identity_support import FakeApiServer, identity_server, kubeconfig, make_ca, token_file
from mesh_support import Client, EchoApp, admin, http_get, load, run_sidecar, traffic_policy
from sidecar_support import MESHLET, free_port

from meshlet.mtls.files import read_bundle

FRONTEND = "spiffe://cluster.local/ns/default/sa/frontend"
REVIEWS = "spiffe://cluster.local/ns/default/sa/reviews"
# The engine is the conformance suite's parameter (tests/integration/conftest.py): both engines.


@pytest.fixture
def cluster(tmp_path):
    with FakeApiServer() as api:
        yield tmp_path, api, kubeconfig(tmp_path / "kubeconfig", {"test": api}, "test"), make_ca(tmp_path / "ca")


def identity_args(url: str, token, bundle) -> list[str]:
    return ["--identity-server", url, "--identity-token", str(token), "--trust-bundle", str(bundle)]


def certs(sidecar) -> dict:
    status, body = admin(sidecar, "GET", "/certs")
    assert status == 200, body
    return body


def readyz(sidecar) -> int:
    return admin(sidecar, "GET", "/readyz")[0]


class Traffic:
    """Requests through A to B's STRICT inbound until stopped, each batch on new connections (so
    new mTLS handshakes keep happening with whatever certificates the sidecars hold then)."""

    def __init__(self, a) -> None:
        self.a, self.results, self.stop = a, [], threading.Event()
        self.pool = ThreadPoolExecutor(1)

    def __enter__(self) -> Traffic:
        def keep_loading() -> None:
            while not self.stop.is_set():
                self.results.extend(load(self.a.outbound, 20, connections=2, host="reviews"))
                time.sleep(0.05)

        self.running = self.pool.submit(keep_loading)
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.running.result(60)
        self.pool.shutdown()

    def failures(self) -> list:
        return [r for r in self.results if isinstance(r, Exception) or r.status != 200]


@pytest.fixture
def app():
    app = EchoApp()
    yield app
    app.close()


@contextlib.contextmanager
def mesh_pair(root, api, url: str, bundle, engine: str, app, b_workers: int = 1) -> Iterator[tuple]:
    """Sidecar B (reviews, STRICT, admits frontend) and A (frontend, reaches B over mTLS), each
    with its own token and the same trust bundle file."""
    b_policy = traffic_policy("self", "self", "127.0.0.1:9", mode="STRICT", allow=(FRONTEND,))
    b_token = token_file(root, api, "default", "reviews")
    with run_sidecar(b_policy, "--engine", engine, *identity_args(url, b_token, bundle), app_port=app.port,
                     workers=b_workers) as b:
        a_policy = traffic_policy("reviews", "reviews", f"127.0.0.1:{b.inbound[1]}", tls="mesh", identity=REVIEWS)
        a_token = token_file(root, api, "default", "frontend")
        with run_sidecar(a_policy, "--engine", engine, *identity_args(url, a_token, bundle)) as a:
            yield a, b
            assert "Traceback" not in a.stderr() + b.stderr()


def test_a_refused_token_stops_the_sidecar_with_one_line(cluster, engine):
    root, api, config, ca_dir = cluster
    token = token_file(root, api, "default", "frontend", audiences=("vault",))
    policy = root / "p.yaml"
    policy.write_text(traffic_policy("self", "self", "127.0.0.1:9", mode="STRICT"))
    with identity_server(ca_dir, config) as server:
        result = subprocess.run(
            [MESHLET, "run", "--engine", engine, "--policy", str(policy), "--outbound", "127.0.0.1:0",
             "--inbound", "127.0.0.1:0", "--admin", "127.0.0.1:0", *identity_args(server.url, token, ca_dir / "ca.pem")],
            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith(f"meshlet: identity server {server.url} refused this workload (unauthenticated): ")
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith("meshlet: ")
    assert "invalid for the target audiences ['meshlet']" in result.stderr.splitlines()[-1]


def test_readiness_waits_for_the_certificate(cluster, engine, app):
    root, api, config, ca_dir = cluster
    port = free_port()
    token = token_file(root, api, "default", "reviews")
    policy = traffic_policy("self", "self", "127.0.0.1:9", mode="PERMISSIVE")
    url = f"https://127.0.0.1:{port}"
    with run_sidecar(policy, "--engine", engine, *identity_args(url, token, ca_dir / "ca.pem"),
                     app_port=app.port) as b:
        assert readyz(b) == 503  # listening, but no certificate: the service is not up yet
        assert certs(b)["identity"] is None and "cannot reach" in certs(b)["error"]
        assert http_get(b.inbound) == (200, "app -\n")  # plaintext still served meanwhile (PERMISSIVE)
        with identity_server(ca_dir, config, port=port):
            deadline = time.monotonic() + 30
            while readyz(b) != 200:
                assert time.monotonic() < deadline, "not ready 30s after the identity service came up"
                time.sleep(0.2)
            assert certs(b)["identity"] == REVIEWS


def test_two_sidecars_keep_a_strict_hop_for_a_minute_on_20s_certificates(cluster, engine, app):
    root, api, config, ca_dir = cluster
    serials: dict[str, set[str]] = {"a": set(), "b": set()}
    with (identity_server(ca_dir, config, ttl="20s") as server,
          mesh_pair(root, api, server.url, ca_dir / "ca.pem", engine, app, b_workers=2) as (a, b)):
        established = Client(a.outbound)  # a keep-alive connection opened before any renewal
        assert established.request(host="reviews").body == f"app {FRONTEND}\n"
        sock = established.conn.sock
        with Traffic(a) as traffic:
            end = time.monotonic() + 60
            while time.monotonic() < end:
                serials["a"].add(certs(a)["serial"])
                serials["b"].add(certs(b)["serial"])
                if len(serials["a"]) % 2:  # now and then, so the client connection never idles out (60 s)
                    assert established.request(host="reviews").body == f"app {FRONTEND}\n"
                time.sleep(1)
        # still the same connection, still answered, after five or more renewals on each side
        assert established.request(host="reviews").body == f"app {FRONTEND}\n"
        assert established.conn.sock is sock
        established.close()
    assert traffic.failures() == []
    assert len(traffic.results) >= 200
    assert {r.body for r in traffic.results} == {f"app {FRONTEND}\n"}
    # renewed at half-life: a new certificate about every 10s on both sides
    assert len(serials["a"]) >= 5 and len(serials["b"]) >= 5, serials


def issuer(sidecar) -> str:
    return certs(sidecar)["issuer"]


def test_ca_rotation_under_traffic_fails_no_request(cluster, engine, app):
    root, api, config, ca_dir = cluster
    trust = root / "trust.pem"  # what the kubelet keeps in sync from the trust-bundle ConfigMap
    shutil.copy(ca_dir / "ca.pem", trust)

    def meshlet_ca(*args: str) -> None:
        result = subprocess.run([MESHLET, "ca", "rotate", "--dir", str(ca_dir), *args], capture_output=True,
                                text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        shutil.copy(ca_dir / "bundle.pem", trust)  # the ConfigMap follows the CA Secret

    with (identity_server(ca_dir, config, ttl="6s") as server,
          mesh_pair(root, api, server.url, trust, engine, app) as (a, b)):
        old = issuer(a)
        with Traffic(a) as traffic:
            time.sleep(1)
            meshlet_ca("--grace", "3s")  # both CAs trusted before the new one signs
            deadline = time.monotonic() + 30
            while issuer(a) == old or issuer(b) == old:
                assert time.monotonic() < deadline, "no certificate from the new CA within 30s"
                time.sleep(0.3)
            time.sleep(7)  # every certificate of the old CA has expired now (6s TTL)
            meshlet_ca("--finish")  # the old CA is trusted no more
            time.sleep(4)
        assert issuer(a) != old and issuer(b) != old
    assert traffic.failures() == []
    assert len(traffic.results) >= 100
    assert len(read_bundle(trust)) == 1


def test_the_new_issuer_is_the_rotated_ca(tmp_path):
    """`meshlet ca rotate` writes a second root into bundle.pem under a distinct name."""
    ca_dir = make_ca(tmp_path / "ca")
    result = subprocess.run([MESHLET, "ca", "rotate", "--dir", str(ca_dir), "--grace", "1m"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    bundle = read_bundle(ca_dir / "bundle.pem")
    assert len({c.subject for c in bundle}) == 2
    assert all(c.extensions.get_extension_for_class(x509.BasicConstraints).value.ca for c in bundle)
    again = subprocess.run([MESHLET, "ca", "rotate", "--dir", str(ca_dir)], capture_output=True, text=True, timeout=30)
    assert again.returncode == 1 and "a rotation is already under way" in again.stderr
    early = subprocess.run([MESHLET, "ca", "rotate", "--dir", str(ca_dir), "--finish"], capture_output=True,
                           text=True, timeout=30)
    assert early.returncode == 1 and "signs only from" in early.stderr


def key_files(root) -> list[str]:
    """Every file under `root` holding a PEM private key."""
    found = []
    for path in root.rglob("*"):
        if path.is_file() and b"PRIVATE KEY-----" in path.read_bytes():
            found.append(str(path.relative_to(root)))
    return sorted(found)


def test_workload_keys_never_touch_the_file_system(cluster, engine, tmp_path_factory):
    """With HOME and TMPDIR pointing at fresh dirs, the sidecars serve mTLS both ways, through
    mitmproxy's path and meshlet's own upstream client (a route with a timeout), with two
    workers each fetching its certificate: the only key file afterwards is mitmproxy's own
    interception CA (which mesh TLS never uses)."""
    root, api, config, ca_dir = cluster
    app = EchoApp()
    homes = {name: tmp_path_factory.mktemp(f"home-{name}") for name in ("a", "b")}
    try:
        with identity_server(ca_dir, config, ttl="30s") as server:
            b_policy = traffic_policy("self", "self", "127.0.0.1:9", mode="STRICT", allow=(FRONTEND,))
            b_token = token_file(root, api, "default", "reviews")
            env_b = {"HOME": str(homes["b"]), "TMPDIR": str(homes["b"])}
            with run_sidecar(b_policy, "--engine", engine, *identity_args(server.url, b_token, ca_dir / "ca.pem"),
                             app_port=app.port, workers=2, env=env_b) as b:
                a_policy = traffic_policy("reviews", "reviews", f"127.0.0.1:{b.inbound[1]}", tls="mesh",
                                          identity=REVIEWS, route="timeout: 5s")
                a_token = token_file(root, api, "default", "frontend")
                env_a = {"HOME": str(homes["a"]), "TMPDIR": str(homes["a"])}
                with run_sidecar(a_policy, "--engine", engine, *identity_args(server.url, a_token, ca_dir / "ca.pem"),
                                 workers=2, env=env_a) as a:
                    answers = load(a.outbound, 20, connections=2, host="reviews")
                    assert [getattr(r, "status", r) for r in answers] == [200] * 20
            assert server.metric("meshlet_identity_certificates_issued_total") >= 4  # two workers each
    finally:
        app.close()
    for home in homes.values():
        assert [f for f in key_files(home) if not f.startswith(".mitmproxy/")] == []
