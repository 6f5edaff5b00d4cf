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
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

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

    def run_sidecar(self, work: Path, policy: str, *extra: str) -> Path:
        """`meshlet run` in the Pod namespace as the sidecar's UID (its own connections are not
        captured), on the injected ports; returns its log once it is ready."""
        os.chmod(work, 0o755)
        home = work / "home"
        home.mkdir()
        os.chown(home, CFG.uid, CFG.uid)
        (work / "policy.yaml").write_text(policy)
        log = home / "sidecar.log"
        with open(log, "wb") as err:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.pod, *as_uid(CFG.uid), sys.executable, "-m", "meshlet.cli", "run",
                 "--policy", str(work / "policy.yaml"), "--workers", "1",
                 "--outbound", f"127.0.0.1:{CFG.outbound_port}", "--inbound", f"0.0.0.0:{CFG.inbound_port}",
                 "--admin", f"127.0.0.1:{CFG.admin_port}", *extra],
                stdout=subprocess.DEVNULL, stderr=err,
                # No -O re-exec: on this machine the venv's interpreter lives under /root, which
                # setpriv can start for the sidecar's UID but the UID itself may not exec again.
                env={**os.environ, "HOME": str(home), "MESHLET_WORKER_DEBUG": "1"},
            )
        self.processes.append(proc)
        deadline = time.monotonic() + 60
        while "ready outbound=" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        return log

    def install_redirect(self, bypass: sidecar.Bypass = sidecar.NO_BYPASS) -> str:
        """The injected init container's script, run in the Pod namespace; the nat table after it."""
        script = sidecar.redirect_script(CFG, bypass)
        result = sh("ip", "netns", "exec", self.pod, "/bin/sh", "-c", script, check=False)
        assert result.returncode == 0, result.stderr
        return sh("ip", "netns", "exec", self.pod, "iptables", "-t", "nat", "-S").stdout


@contextlib.contextmanager
def pod_network(prefix: str = "mk8s", ipv6: bool = False) -> Iterator[PodNet]:
    """`prefix` names the namespaces (PREFIX-pod-TAG, PREFIX-peer-TAG); its first two letters the veths.
    `ipv6`: the Pod and the peer get IPv6 addresses too (POD_IP6, PEER_IP6): a dual-stack Pod."""
    tag = uuid.uuid4().hex[:6]
    net = PodNet(f"{prefix}-pod-{tag}", f"{prefix}-peer-{tag}")
    pod_dev, peer_dev = f"{prefix[:2]}p{tag}", f"{prefix[:2]}q{tag}"
    try:
        sh("ip", "netns", "add", net.pod)
        sh("ip", "netns", "add", net.peer)
        sh("ip", "link", "add", pod_dev, "netns", net.pod, "type", "veth", "peer", "name", peer_dev, "netns", net.peer)
        for ns, dev, addr, addr6 in ((net.pod, pod_dev, POD_IP, POD_IP6), (net.peer, peer_dev, PEER_IP, PEER_IP6)):
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
