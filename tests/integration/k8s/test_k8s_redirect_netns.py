"""The injected init container's iptables script, run for real in a Pod-like network namespace.

Two namespaces joined by a veth pair stand in for a Pod and a peer (TEST-NET addresses that
exist only inside them). Listeners answer with their role and the connection's original
destination (SO_ORIGINAL_DST), so each check shows where the kernel really delivered it.
"""

from __future__ import annotations

import sys

import pytest
from podnet_support import CFG, NEEDS, PEER_IP, POD_IP, as_uid, pod_network, sh

from meshlet.ebpf.kernel_split import BYPASS_MARK
from meshlet.k8s import sidecar

pytestmark = NEEDS

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
c = socket.socket()
if len(sys.argv) > 3:
    c.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, int(sys.argv[3], 0))  # as the agent's connect4 hook does
c.settimeout(5)
c.connect((sys.argv[1], int(sys.argv[2])))
print(c.recv(200).decode())
"""


@pytest.fixture
def namespaces():
    with pod_network() as net:
        net.start(net.pod, SERVER, f"outbound,127.0.0.1,{CFG.outbound_port}", f"inbound,0.0.0.0,{CFG.inbound_port}",
                  f"health,0.0.0.0,{CFG.health_port}", f"admin,127.0.0.1,{CFG.admin_port}", "app,0.0.0.0,8080")
        net.start(net.peer, SERVER, "peer,0.0.0.0,80", "peer,0.0.0.0,8080")
        yield net


def connect(ns: str, host: str, port: int, uid: int = 0, mark: int | None = None) -> str:
    marked = [hex(mark)] if mark is not None else []
    result = sh("ip", "netns", "exec", ns, *as_uid(uid), sys.executable, "-c", CLIENT, host, str(port), *marked,
                check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def reached(ns: str, host: str, port: int, uid: int = 0, mark: int | None = None) -> str:
    """Which listener answered (for connections that were not redirected)."""
    return connect(ns, host, port, uid, mark).split()[0]


def test_redirect_captures_inbound_and_outbound_but_not_the_proxy_or_health(namespaces):
    net = namespaces
    pod, peer = net.pod, net.peer
    assert reached(peer, POD_IP, 8080) == "app", "before the script, traffic goes straight to the app"
    net.install_redirect()
    assert connect(peer, POD_IP, 8080) == f"inbound {POD_IP}:8080"
    assert reached(peer, POD_IP, CFG.health_port) == "health", "probes and scrapes reach the health port directly"
    for port in (CFG.admin_port, CFG.outbound_port):  # loopback-only listeners: the kernel refuses a peer
        result = sh("ip", "netns", "exec", peer, sys.executable, "-c", CLIENT, POD_IP, str(port), check=False)
        assert "ConnectionRefusedError" in result.stderr, (port, result.stdout)
    assert connect(pod, PEER_IP, 80) == f"outbound {PEER_IP}:80"
    assert reached(pod, PEER_IP, 8080, uid=CFG.uid) == "peer", "the proxy's own traffic must not loop"
    assert reached(pod, "127.0.0.1", 8080) == "app", "loopback (sidecar → app) is not captured"


def test_running_the_script_twice_leaves_the_same_rules(namespaces):
    first = namespaces.install_redirect()
    assert namespaces.install_redirect() == first
    assert first.count("-j MESHLET_INBOUND") == 1 and first.count("-j MESHLET_OUTPUT") == 1


def test_excluded_ports_bypass_the_sidecar_both_ways(namespaces):
    namespaces.install_redirect(sidecar.Bypass(inbound=(8080,), outbound=(8080,)))
    pod, peer = namespaces.pod, namespaces.peer
    assert reached(pod, PEER_IP, 8080) == "peer", "an excluded outbound port goes straight out"
    assert connect(pod, PEER_IP, 80) == f"outbound {PEER_IP}:80", "other ports are still captured"
    assert reached(peer, POD_IP, 8080) == "app", "an excluded inbound port reaches the app directly"


def test_connections_the_kernel_split_bypass_the_sidecar(namespaces):
    """The node agent's connect4 hook marks what it rewrote: the redirect lets those through."""
    namespaces.install_redirect()
    pod = namespaces.pod
    assert reached(pod, PEER_IP, 8080, mark=BYPASS_MARK) == "peer"
    assert connect(pod, PEER_IP, 8080, mark=BYPASS_MARK + 1) == f"outbound {PEER_IP}:8080", "another mark is captured"
    assert connect(pod, PEER_IP, 8080) == f"outbound {PEER_IP}:8080"
