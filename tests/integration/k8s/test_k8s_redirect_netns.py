"""The injected init container's iptables script, run for real in a Pod-like network namespace.

Two namespaces joined by a veth pair stand in for a Pod and a peer (TEST-NET addresses that
exist only inside them). Listeners answer with their role and the connection's original
destination (SO_ORIGINAL_DST), so each check shows where the kernel really delivered it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid

import pytest

from meshlet.k8s import sidecar
from meshlet.k8s.sidecar import InjectConfig

CFG = InjectConfig()
POD_IP, PEER_IP = "192.0.2.1", "192.0.2.2"

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces and iptables"),
    pytest.mark.skipif(not all(map(shutil.which, ("ip", "iptables", "setpriv"))),
                       reason="needs ip (iproute2), iptables and setpriv (util-linux); scripts/setup installs them"),
]

SERVER = r"""
import socket, struct, sys, threading
def serve(label, host, port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((host, port)); s.listen(16)
    def loop():
        while True:
            c, _ = s.accept()
            try:
                raw = c.getsockopt(socket.SOL_IP, 80, 16)  # SO_ORIGINAL_DST
                dst = f"{socket.inet_ntoa(raw[4:8])}:{struct.unpack('!H', raw[2:4])[0]}"
            except OSError:
                dst = "-"
            c.sendall(f"{label} {dst}".encode()); c.close()
    threading.Thread(target=loop, daemon=True).start()
for spec in sys.argv[1:]:
    label, host, port = spec.split(",")
    serve(label, host, int(port))
print("ready", flush=True)
sys.stdin.read()
"""
CLIENT = r"""
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
print(c.recv(200).decode())
"""


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=30, check=check)


@pytest.fixture
def namespaces():
    tag = uuid.uuid4().hex[:6]
    pod, peer = f"mk8s-pod-{tag}", f"mk8s-peer-{tag}"
    servers: list[subprocess.Popen] = []
    try:
        sh("ip", "netns", "add", pod)
        sh("ip", "netns", "add", peer)
        sh("ip", "link", "add", f"mkp{tag}", "netns", pod, "type", "veth", "peer", "name", f"mkq{tag}", "netns", peer)
        for ns, dev, addr in ((pod, f"mkp{tag}", POD_IP), (peer, f"mkq{tag}", PEER_IP)):
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")

        def start(ns: str, *listeners: str) -> None:
            proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", SERVER, *listeners],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            servers.append(proc)
            assert proc.stdout.readline().strip() == "ready"

        start(pod, f"outbound,127.0.0.1,{CFG.outbound_port}", f"inbound,0.0.0.0,{CFG.inbound_port}",
              f"admin,0.0.0.0,{CFG.admin_port}", "app,0.0.0.0,8080")
        start(peer, "peer,0.0.0.0,80", "peer,0.0.0.0,8080")
        yield pod, peer
    finally:
        for proc in servers:
            proc.kill()
            proc.wait(timeout=10)
        for ns in (pod, peer):
            sh("ip", "netns", "del", ns, check=False)


def connect(ns: str, host: str, port: int, uid: int = 0) -> str:
    cmd = ["ip", "netns", "exec", ns]
    if uid:
        cmd += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    result = sh(*cmd, sys.executable, "-c", CLIENT, host, str(port), check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def reached(ns: str, host: str, port: int, uid: int = 0) -> str:
    """Which listener answered (for connections that were not redirected)."""
    return connect(ns, host, port, uid).split()[0]


def install(pod: str) -> str:
    result = sh("ip", "netns", "exec", pod, "/bin/sh", "-c", sidecar.redirect_script(CFG), check=False)
    assert result.returncode == 0, result.stderr
    return sh("ip", "netns", "exec", pod, "iptables", "-t", "nat", "-S").stdout


def test_redirect_captures_inbound_and_outbound_but_not_the_proxy_or_admin(namespaces):
    pod, peer = namespaces
    assert reached(peer, POD_IP, 8080) == "app", "before the script, traffic goes straight to the app"
    install(pod)
    assert connect(peer, POD_IP, 8080) == f"inbound {POD_IP}:8080"
    assert reached(peer, POD_IP, CFG.admin_port) == "admin", "probes and scrapes reach admin directly"
    assert connect(pod, PEER_IP, 80) == f"outbound {PEER_IP}:80"
    assert reached(pod, PEER_IP, 8080, uid=CFG.uid) == "peer", "the proxy's own traffic must not loop"
    assert reached(pod, "127.0.0.1", 8080) == "app", "loopback (sidecar → app) is not captured"


def test_running_the_script_twice_leaves_the_same_rules(namespaces):
    pod, _ = namespaces
    first = install(pod)
    assert install(pod) == first
    assert first.count("-j MESHLET_INBOUND") == 1 and first.count("-j MESHLET_OUTPUT") == 1
