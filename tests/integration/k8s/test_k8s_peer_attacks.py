"""A peer of the cluster attacks an injected Pod: every attack is refused, and traffic shows it.

The Pod namespace (192.0.2.1, 2001:db8::1: dual stack) runs the injected init container's
redirect script, then `meshlet run` as the sidecar's UID with the injected container's
arguments (only the identity and labels files sit in a temp dir instead of /etc/meshlet, and
`--engine` is the parameter; the certificate comes as a dir, as with csi-driver-spiffe). It follows the namespace's TrafficPolicies with `--watch-kube`
from a fake API server in the peer namespace: the one faked part (tests/integration/k8s/
fake_apiserver.py: no kube-apiserver can run here). The namespace's policies are those of the
issue: a PERMISSIVE namespace default listed first, another workload's DISABLE, and this
workload's STRICT with an allow list, picked by its labels. The peer namespace (192.0.2.2,
2001:db8::2) holds the payments service (stable and canary), an attacker's server, and mesh
certificates for an allowed caller (frontend) and a mesh workload that is not allowed.

Each attack is checked by its effect: where the app's outbound calls go, what reached the app
or a loopback-only service, which policy generation runs, and what the metrics counted.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from podnet_support import CFG, NEEDS, PEER_IP, PEER_IP6, POD_IP, POD_IP6, as_uid, pod_network, sh

from meshlet.k8s import sidecar
from meshlet.mtls.ca import issue_workload, new_authority
from meshlet.mtls.files import write_identity

# Per engine (tests/integration/conftest.py): both apply meshlet.proxy.inbound.
pytestmark = [*NEEDS, pytest.mark.timeout(180)]
HERE = Path(__file__).parent
TRUST = "spiffe://cluster.local/ns/shop/sa"
APP_PORT, SECRET_PORT, API_PORT = 8080, 9999, 6443
STABLE_PORT, CANARY_PORT, EVIL_PORT = 8081, 8082, 6666
LABELS = 'app="reviews"\nversion="v1"\npod-template-hash="5d8f"\n'


def policy(name: str, host: str, backends: dict, routes: list, mtls: dict | None = None) -> dict:
    spec = {"host": host, "backends": backends, "routes": routes, **({"mtls": mtls} if mtls else {})}
    return {"apiVersion": "meshlet.dev/v1alpha1", "kind": "TrafficPolicy",
            "metadata": {"name": name, "namespace": "shop"}, "spec": spec}


ONE = [{"name": "all", "to": [{"backend": "v1"}]}]
NAMESPACE = [  # listed in name order: "the first policy with an mtls section" would be PERMISSIVE
    policy("details", "details", {"v1": {"address": f"{PEER_IP}:9000"}}, ONE, {"mode": "PERMISSIVE"}),
    policy("payments", "payments", {"v1": {"address": f"{PEER_IP}:{STABLE_PORT}"},
                                    "v2": {"address": f"{PEER_IP}:{CANARY_PORT}"}},
           [{"name": "main", "to": [{"backend": "v1", "weight": 100}, {"backend": "v2", "weight": 0}],
             "rollout": {"canary": "v2", "stable": "v1", "steps": [50, 100], "interval": "1h"}}]),
    policy("ratings", "ratings", {"v1": {"address": f"{PEER_IP}:9001"}}, ONE,
           {"mode": "DISABLE", "selector": {"matchLabels": {"app": "ratings"}}}),
    policy("reviews", "reviews", {"v1": {"address": f"{POD_IP}:{APP_PORT}"}}, ONE,
           {"mode": "STRICT", "allow": [f"{TRUST}/frontend"], "selector": {"matchLabels": {"app": "reviews"}}}),
]
EVIL = """\
apiVersion: meshlet.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: payments, namespace: shop}
spec:
  host: payments
  backends: {evil: {address: "192.0.2.2:6666"}}
  routes: [{name: all, to: [{backend: evil}]}]
  mtls: {mode: DISABLE}
"""

# HTTP servers that answer with who they are and what they saw, and append a line per request.
SERVERS = r"""
import json, socket, sys, threading
log = open(sys.argv[1], "a", buffering=1)
def serve(name, host, port):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind((host, port)); s.listen(64)
    def handle(c, peer):
        with c:
            head = b""
            while b"\r\n\r\n" not in head and (chunk := c.recv(4096)):
                head += chunk
            headers = dict(l.split(": ", 1) for l in head.decode("latin-1").split("\r\n")[1:] if ": " in l)
            seen = {"server": name, "peer": peer[0].removeprefix("::ffff:"),
                    "xff": headers.get("x-forwarded-for"), "identity": headers.get("x-meshlet-peer-identity")}
            log.write(json.dumps(seen) + "\n")
            body = json.dumps(seen).encode()
            c.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    def loop():
        while True:
            c, peer = s.accept()
            threading.Thread(target=handle, args=(c, peer), daemon=True).start()
    threading.Thread(target=loop, daemon=True).start()
for spec in sys.argv[2:]:
    name, host, port = spec.rsplit(",", 2)
    serve(name, host, int(port))
print("ready", flush=True)
sys.stdin.read()
"""
API_SERVER = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from fake_apiserver import FakeApiServer
server = FakeApiServer(host=sys.argv[2], port=int(sys.argv[3])).__enter__()
for obj in json.load(open(sys.argv[4])):
    server.put(obj)
print("ready", flush=True)
sys.stdin.read()
"""
# Requests as JSON [{host, port, tls: null|"frontend"|"attacker", method, path, host_header, headers, body}];
# answers [{status, body, error}]: status None when the connection closed without an HTTP answer.
CLIENT = r"""
import json, socket, ssl, sys
certs = sys.argv[1]
out = []
for r in json.load(sys.stdin):
    try:
        conn = socket.create_connection((r["host"], r["port"]), timeout=5)
        if r.get("tls"):
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); ctx.check_hostname = False
            ctx.load_verify_locations(f"{certs}/{r['tls']}/ca.pem")
            ctx.load_cert_chain(f"{certs}/{r['tls']}/cert.pem", f"{certs}/{r['tls']}/key.pem")
            conn = ctx.wrap_socket(conn)
        body = r.get("body", "").encode()
        head = f"{r.get('method', 'GET')} {r.get('path', '/')} HTTP/1.1\r\nHost: {r.get('host_header', 'x')}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in r.get("headers", {}).items())
        conn.sendall((head + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
        conn.close()
        status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else None
        out.append({"status": status, "body": data.partition(b"\r\n\r\n")[2].decode("latin-1"), "error": None})
    except (OSError, ssl.SSLError) as e:
        out.append({"status": None, "body": "", "error": f"{type(e).__name__}: {e}"})
print(json.dumps(out))
"""


class Pod:
    def __init__(self, net, work: Path, logs: dict[str, Path]):
        self.net, self.work, self.logs = net, work, logs

    def requests(self, ns: str, *calls: dict) -> list[dict]:
        """Send `calls` from namespace `ns` (the Pod's as root: redirected like the app's own)."""
        result = sh("ip", "netns", "exec", ns, sys.executable, "-c", CLIENT, str(self.work / "certs"),
                    check=False, stdin=json.dumps(calls))
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def peer(self, *calls: dict) -> list[dict]:
        return self.requests(self.net.peer, *calls)

    def app(self, *calls: dict) -> list[dict]:
        return self.requests(self.net.pod, *calls)

    def control(self, method: str = "GET", path: str = "/policy", **extra) -> dict:
        """The control API from inside the Pod (loopback), as `meshlet apply` or port-forward would."""
        (answer,) = self.app({"host": "127.0.0.1", "port": CFG.admin_port, "method": method, "path": path, **extra})
        assert answer["status"] is not None, answer
        return {"status": answer["status"], **json.loads(answer["body"] or "{}")}

    def hits(self, server: str) -> list[dict]:
        return [json.loads(line) for line in self.logs["seen"].read_text().splitlines()
                if json.loads(line)["server"] == server]

    def payments(self, n: int = 10) -> list[str]:
        """Where the app's calls to `payments` end up (the app dials any address; iptables redirects)."""
        calls = [{"host": PEER_IP, "port": STABLE_PORT, "host_header": "payments"}] * n
        return [json.loads(a["body"])["server"] if a["status"] == 200 else f"status {a['status']}"
                for a in self.app(*calls)]


def write_mesh(work: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    authority = new_authority(now - dt.timedelta(minutes=5), name="mesh CA")
    for name in ("reviews", "frontend", "attacker"):
        write_identity(work / "certs" / name, issue_workload(authority, f"{TRUST}/{name}", now), authority.cert)
    for path in [work / "certs" / "reviews", *(work / "certs" / "reviews").iterdir()]:
        os.chown(path, CFG.uid, CFG.uid)  # the sidecar's UID reads its key


def sidecar_args(work: Path, engine: str) -> list[str]:
    """The injected container's arguments, with its two files in `work` instead of /etc/meshlet.
    The identity comes as with `proxy.identity.mode=csi` (a certificate dir), not from the identity
    service, which tests/integration/identity covers."""
    args = sidecar.proxy_container(dataclasses.replace(CFG, identity="csi"), APP_PORT)["args"]
    args = [str(work / "certs" / "reviews") if a == sidecar.IDENTITY_DIR else a for a in args]
    args = [str(work / "labels") if a == f"{sidecar.PODINFO_DIR}/labels" else a for a in args]
    return [*args, "--engine", engine]


@pytest.fixture(scope="module")
def pod(engine: str):
    with tempfile.TemporaryDirectory(prefix="sec-attack-") as tmp, pod_network(ipv6=True) as net:
        work = Path(tmp)
        os.chmod(work, 0o755)
        write_mesh(work)
        (work / "labels").write_text(LABELS)
        (work / "namespace.json").write_text(json.dumps(NAMESPACE))
        logs = {"seen": work / "seen.log", "sidecar": work / "sidecar.log"}
        net.start(net.peer, API_SERVER, str(HERE), PEER_IP, str(API_PORT), str(work / "namespace.json"))
        net.start(net.peer, SERVERS, str(logs["seen"]), f"payments-stable,0.0.0.0,{STABLE_PORT}",
                  f"payments-canary,0.0.0.0,{CANARY_PORT}", f"attacker,0.0.0.0,{EVIL_PORT}")
        net.start(net.pod, SERVERS, str(logs["seen"]), f"app,::,{APP_PORT}", f"secret,127.0.0.1,{SECRET_PORT}")
        kubeconfig = work / "kubeconfig"
        kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "pod",
            "clusters": [{"name": "c", "cluster": {"server": f"http://{PEER_IP}:{API_PORT}"}}],
            "users": [{"name": "u", "user": {"token": "test-token"}}],
            "contexts": [{"name": "pod", "context": {"cluster": "c", "user": "u", "namespace": "shop"}}],
        }))
        net.install_redirect()  # the init container runs first, as in a Pod
        home = work / "home"
        home.mkdir()
        os.chown(home, CFG.uid, CFG.uid)
        with open(logs["sidecar"], "wb") as err:
            process = subprocess.Popen(
                ["ip", "netns", "exec", net.pod, *as_uid(CFG.uid), sys.executable, "-m", "meshlet.cli",
                 *sidecar_args(work, engine)],
                stdout=subprocess.DEVNULL, stderr=err,
                env={**os.environ, "HOME": str(home), "KUBECONFIG": str(kubeconfig), "MESHLET_WORKER_DEBUG": "1"},
            )
        net.processes.append(process)
        pod = Pod(net, work, logs)
        deadline = time.monotonic() + 60
        while "payments" not in (policy_text := _policy_or_empty(pod)) or "reviews" not in policy_text:
            assert process.poll() is None and time.monotonic() < deadline, logs["sidecar"].read_text()
            time.sleep(0.2)
        yield pod


def _policy_or_empty(pod: Pod) -> str:
    (answer,) = pod.app({"host": "127.0.0.1", "port": CFG.admin_port, "path": "/policy"})
    return json.loads(answer["body"])["policy"] if answer["status"] == 200 else ""


def refused(answers: list[dict]) -> bool:
    """No HTTP answer at all: the connection was refused, reset or closed."""
    return all(a["status"] is None for a in answers)


def test_the_control_api_and_outbound_listener_are_unreachable_from_a_peer(pod):
    before = pod.control()
    assert pod.payments(5) == ["payments-stable"] * 5
    put = {"method": "PUT", "path": "/policy", "body": EVIL, "headers": {"x-meshlet-generation": "999"}}
    attacks = [
        {"host": host, "port": port, "tls": tls, **call}
        for host in (POD_IP, POD_IP6)
        for port in (CFG.admin_port, CFG.outbound_port)
        for tls in (None, "frontend")  # plaintext, and mTLS as a caller the policy allows
        for call in (put, {"method": "POST", "path": "/rollouts/payments/start"},
                     {"method": "POST", "path": "/rollouts/payments/promote"},
                     {"path": "/policy"}, {"path": "/certs"}, {"path": "/rollouts"}, {"path": "/metrics"},
                     {"host_header": "payments"})
    ]
    answers = pod.peer(*attacks)
    assert refused(answers), [(a, b) for a, b in zip(attacks, answers, strict=True) if b["status"] is not None]
    # The effects an open control API had: none.
    assert pod.payments(20) == ["payments-stable"] * 20, "no rollout moved traffic to the canary"
    assert pod.hits("attacker") == [] and pod.hits("payments-canary") == []
    after = pod.control()
    assert after["generation"] == before["generation"] and after["policy"] == before["policy"]
    rollouts = pod.control(path="/rollouts")["rollouts"]
    assert all(r.get("weight", 0) == 0 for r in rollouts), rollouts
    assert pod.peer({"host": POD_IP, "port": APP_PORT, "path": "/"})[0]["status"] is None, "still STRICT"


def test_the_health_port_answers_probes_and_scrapes_and_nothing_else(pod):
    reads = [{"host": h, "port": CFG.health_port, "path": p} for h in (POD_IP, POD_IP6)
             for p in ("/healthz", "/readyz", "/metrics", "/policy", "/certs", "/rollouts", "/rollouts/payments")]
    writes = [{"host": POD_IP, "port": CFG.health_port, "method": m, "path": p, "body": EVIL} for m, p in (
        ("PUT", "/policy"), ("POST", "/rollouts/payments/start"), ("POST", "/rollouts/payments/promote"))]
    statuses = [a["status"] for a in pod.peer(*reads, *writes)]
    assert statuses == [200, 200, 200, 404, 404, 404, 404] * 2 + [404, 404, 404]
    bodies = "".join(a["body"] for a in pod.peer(*reads))
    assert str(pod.work) not in bodies and "BEGIN CERTIFICATE" not in bodies  # no identity paths or certificates
    assert pod.payments(5) == ["payments-stable"] * 5


def test_inbound_reaches_only_the_pod_address_and_the_app_sees_who_called(pod):
    spoof = {"x-forwarded-for": "127.0.0.1", "x-real-ip": "127.0.0.1", "x-meshlet-peer-identity": f"{TRUST}/admin"}
    answers = pod.peer(
        {"host": POD_IP, "port": SECRET_PORT, "tls": "frontend"},  # bound to 127.0.0.1 in the Pod
        {"host": POD_IP6, "port": SECRET_PORT, "tls": "frontend"},
        {"host": POD_IP, "port": APP_PORT, "tls": "frontend", "headers": spoof},
        {"host": POD_IP6, "port": APP_PORT, "tls": "frontend", "headers": spoof},
        {"host": POD_IP, "port": CFG.inbound_port, "tls": "frontend"},  # to the inbound port itself: the app
    )
    assert [a["status"] for a in answers[:2]] != [200, 200] and pod.hits("secret") == []
    assert [a["status"] for a in answers[2:]] == [200] * 3, ([a["error"] for a in answers], pod.logs["sidecar"].read_text()[-3000:])
    seen = [json.loads(a["body"]) for a in answers[2:]]
    assert [s["server"] for s in seen] == ["app"] * 3
    assert [s["peer"] for s in seen] == [POD_IP, POD_IP6, POD_IP], "from the Pod's address, never loopback"
    assert [s["xff"] for s in seen] == [PEER_IP, PEER_IP6, PEER_IP], "set by the sidecar, the caller's dropped"
    assert {s["identity"] for s in seen} == {f"{TRUST}/frontend"}


def test_inbound_mtls_is_this_workloads_strict_in_both_families_and_refusals_are_counted(pod):
    app_hits = len(pod.hits("app"))
    plaintext = pod.peer(*({"host": h, "port": p} for h in (POD_IP, POD_IP6) for p in (APP_PORT, CFG.inbound_port)))
    assert refused(plaintext), "STRICT: the namespace default (PERMISSIVE) and ratings' DISABLE do not apply here"
    denied = pod.peer(*({"host": h, "port": APP_PORT, "tls": "attacker"} for h in (POD_IP, POD_IP6)))
    assert [a["status"] for a in denied] == [403, 403], "a mesh identity that the allow list does not name"
    assert len(pod.hits("app")) == app_hits, "nothing reached the app"
    (metrics,) = pod.peer({"host": POD_IP, "port": CFG.health_port, "path": "/metrics"})
    counted = [line for line in metrics["body"].splitlines()
               if line.startswith("meshlet_requests_total{") and 'direction="inbound"' in line and 'code="403"' in line]
    assert counted and sum(float(line.rsplit(" ", 1)[1]) for line in counted) >= 2


def test_locally_the_control_api_still_works_and_ignores_internal_headers(pod):
    """Last: the Pod's own processes may change its policy (as `meshlet apply` and port-forward
    do); the attacks above were refused, not broken. --watch-kube puts the namespace's set back."""
    generation = pod.control()["generation"]
    answer = pod.control("PUT", "/policy", body=EVIL, headers={"x-meshlet-generation": "999",
                                                               "x-meshlet-weights": '{"payments": {}}'})
    assert answer["status"] == 200 and answer["generation"] == generation + 1, answer
    assert set(pod.payments(3)) == {"attacker"}, "the same PUT from the Pod does take effect"
    pod.control("PUT", "/policy", body=yaml.safe_dump_all(NAMESPACE))
    assert pod.payments(3) == ["payments-stable"] * 3
