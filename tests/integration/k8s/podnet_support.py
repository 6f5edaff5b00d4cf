"""A Pod-like network namespace and a peer, joined by a veth pair, for the iptables redirect tests.

TEST-NET addresses exist only inside the two namespaces; everything is removed on exit, even
when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from meshlet.k8s import sidecar
from meshlet.k8s.sidecar import InjectConfig

CFG = InjectConfig()
POD_IP, PEER_IP = "192.0.2.1", "192.0.2.2"
POD_IP6, PEER_IP6 = "2001:db8::1", "2001:db8::2"  # with pod_network(ipv6=True): a dual-stack Pod

NEEDS = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces and iptables"),
    pytest.mark.skipif(not all(map(shutil.which, ("ip", "iptables", "setpriv"))),
                       reason="needs ip (iproute2), iptables and setpriv (util-linux); scripts/setup installs them"),
]


def sh(*args: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=30, check=check, input=stdin)


def as_uid(uid: int) -> list[str]:
    """The command prefix that drops to `uid` (0: stay root)."""
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"] if uid else []


@dataclass
class PodNet:
    pod: str
    peer: str
    processes: list[subprocess.Popen] = field(default_factory=list)

    def start(self, ns: str, script: str, *args: str, uid: int = 0) -> subprocess.Popen:
        """A Python script in namespace `ns` that prints `ready` when it listens; killed on exit."""
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *as_uid(uid), sys.executable, "-c", script, *args],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.processes.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        return proc

    def install_redirect(self, bypass: sidecar.Bypass = sidecar.NO_BYPASS) -> str:
        """The injected init container's script, run in the Pod namespace; the nat table after it."""
        script = sidecar.redirect_script(CFG, bypass)
        result = sh("ip", "netns", "exec", self.pod, "/bin/sh", "-c", script, check=False)
        assert result.returncode == 0, result.stderr
        return sh("ip", "netns", "exec", self.pod, "iptables", "-t", "nat", "-S").stdout


@contextlib.contextmanager
def pod_network(ipv6: bool = False) -> Iterator[PodNet]:
    tag = uuid.uuid4().hex[:6]
    net = PodNet(f"mk8s-pod-{tag}", f"mk8s-peer-{tag}")
    try:
        sh("ip", "netns", "add", net.pod)
        sh("ip", "netns", "add", net.peer)
        sh("ip", "link", "add", f"mkp{tag}", "netns", net.pod, "type", "veth", "peer", "name", f"mkq{tag}",
           "netns", net.peer)
        for ns, dev, addr, addr6 in ((net.pod, f"mkp{tag}", POD_IP, POD_IP6), (net.peer, f"mkq{tag}", PEER_IP, PEER_IP6)):
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            if ipv6:  # nodad: usable at once, no duplicate address detection delay
                sh("ip", "-n", ns, "addr", "add", f"{addr6}/64", "dev", dev, "nodad")
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield net
    finally:
        for proc in net.processes:
            proc.kill()
            proc.wait(timeout=10)
        for ns in (net.pod, net.peer):
            sh("ip", "netns", "del", ns, check=False)
