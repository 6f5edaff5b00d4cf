"""A Kubernetes node on this machine, for the node agent's cluster tests.

Nothing here is a mock but the API server (`fake_apiserver.FakeApiServer`, as everywhere in
these tests: no kube-apiserver can run here). The rest is real and built per test:

- the node: a network namespace with IP forwarding, where `meshlet agent --kube` runs;
- each Pod: its own network namespace, a veth to the node (`10.201.<slot>.2`, the node side
  `.1`) and a cgroup named the way the kubelet's systemd driver names it, from the Pod's UID
  (`<root>/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice`), with
  a `ctr` cgroup below it for the Pod's processes, as a container runtime makes;
- the cluster's Services: a namespace behind the node's uplink (`agt…u`, 10.201.250.0/24)
  whose loopback holds the ClusterIPs (10.96.0.0/24, routed there by the node), which is what
  kube-proxy's DNAT would make of them for these tests.

Everything is named `agt-<tag>…` and removed on exit, even after a failure or a kill -9:
processes, namespaces, cgroups (which frees hooks still attached to them) and pins.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "ebpf"))
sys.path.insert(0, str(Path(__file__).parents[1] / "accel"))
from agent_support import Workload
from ebpf_support import Flood as Flood  # the QoS tests' traffic, re-exported
from ebpf_support import Pinger as Pinger
from ebpf_support import echo as echo
from ebpf_support import inside
from ebpf_support import sink as sink
from fake_apiserver import FakeApiServer, kubeconfig

from meshlet.ebpf import bpfsys, capability
from meshlet.ebpf.cgroup import UNIFIED, Cgroup, remove

MESHLET = Path(sys.executable).parent / "meshlet"
WORKLOAD = Path(__file__).parents[1] / "accel" / "workload.py"
NODE_NAME = "agt-node"
SERVICE_NET = "10.201.250"
SERVICE_HOST = f"{SERVICE_NET}.2"  # the uplink's far end: sinks and echo servers for QoS
CLUSTER_IPS = "10.96.0"
CGROUP_SOCK_OPS, CGROUP_INET4_CONNECT, CGROUP_INET4_GETPEERNAME = 3, 10, 29


def missing() -> str | None:
    problem = capability.missing(capability.probe())
    if problem is None and not (UNIFIED / "cgroup.procs").exists():
        problem = f"no cgroup v2 hierarchy at {UNIFIED}"
    if problem is None and not all(map(shutil.which, ("ip", "iptables", "nsenter", "setpriv"))):
        problem = "needs ip, iptables, nsenter and setpriv (scripts/setup installs them)"
    return problem


NEEDS = [pytest.mark.root,
         pytest.mark.skipif(missing() is not None, reason=f"needs the node agent's capabilities: {missing()}")]


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)}: {result.stderr}")
    return result


def attached(cgroup: Path, attach_type: int) -> tuple[int, ...]:
    """The programs of one type attached to a cgroup (what `bpftool cgroup show` lists)."""
    with Cgroup(cgroup).fd() as fd:
        return bpfsys.attached_ids(fd, attach_type)


@dataclass
class Pod:
    name: str
    namespace: str
    slot: int
    netns: str
    uid: str
    cgroup: Path  # the Pod's (the hooks attach here)
    labels: dict[str, str] = field(default_factory=dict)
    meshed: bool = True

    @property
    def ip(self) -> str:
        return f"10.201.{self.slot}.2"

    @property
    def container(self) -> Path:
        return self.cgroup / "ctr"

    def argv(self, *argv: str) -> list[str]:
        """`argv` run as a process of this Pod: in its container cgroup (joined first: `ip netns
        exec` mounts a sysfs of its own, without the cgroup tree) and its network namespace."""
        return Cgroup(self.container).command(["ip", "netns", "exec", self.netns, *argv])

    def manifest(self) -> dict:
        annotations = {"meshlet.dev/status": "injected"} if self.meshed else {}
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": self.name, "namespace": self.namespace, "uid": self.uid,
                             "labels": dict(self.labels), "annotations": annotations},
                "spec": {"nodeName": NODE_NAME, "containers": [{"name": "app", "image": "app"}]},
                "status": {"phase": "Running", "podIP": self.ip, "podIPs": [{"ip": self.ip}]}}


class AgentProcess:
    """`meshlet agent --kube` in the node's network namespace (nsenter keeps bpffs and tracefs)."""

    def __init__(self, node: Node, flags: list[str], log: Path) -> None:
        self.node, self.log = node, log
        self.metrics_port = 15090
        argv = [str(MESHLET), "agent", "--kube", "--node", NODE_NAME, "--cgroup-root", str(node.kubepods),
                "--pin-dir", str(node.pin_base / "agent"), "--metrics", f"127.0.0.1:{self.metrics_port}",
                "--interval", "0.2s", *flags]
        with log.open("w") as stderr:
            self.process = subprocess.Popen(["nsenter", f"--net=/run/netns/{node.netns}", *argv],
                                            stdout=subprocess.DEVNULL, stderr=stderr,
                                            env={**os.environ, "KUBECONFIG": node.kubeconfig})

    def text(self) -> str:
        return self.log.read_text()

    def wait_for_log(self, needle: str, count: int = 1, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.text().count(needle) < count:
            assert self.process.poll() is None, f"agent exited {self.process.returncode}: {self.text()}"
            assert time.monotonic() < deadline, f"agent never logged {needle!r} x{count}: {self.text()}"
            time.sleep(0.05)

    def metrics(self) -> dict[tuple[str, tuple], float]:
        from prometheus_client.parser import text_string_to_metric_families

        text = http_get(self.node.netns, ("127.0.0.1", self.metrics_port), "/metrics")
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.process.send_signal(sig)
        return self.process.wait(timeout=60)


def http_get(netns: str, address: tuple[str, int], path: str, host: str = "x") -> str:
    """A GET from inside a network namespace; the body."""
    import http.client
    import socket

    with inside(netns):
        sock = socket.create_connection(address, timeout=10)
    conn = http.client.HTTPConnection(*address, timeout=10)
    conn.sock = sock
    try:
        conn.request("GET", path, headers={"Host": host})
        return conn.getresponse().read().decode()
    finally:
        conn.close()


class Node:
    def __init__(self, tmp: Path) -> None:
        self.tag = uuid.uuid4().hex[:6]
        self.tmp = tmp
        self.netns = f"agt-{self.tag}-node"
        self.services = f"agt-{self.tag}-svc"
        self.uplink = f"agt{self.tag}u"  # the node's side: where QoS shapes
        self.cgroup_base = UNIFIED / f"agt-{self.tag}"
        self.kubepods = self.cgroup_base / "kubepods.slice"
        self.pin_base = Path(f"/sys/fs/bpf/agt-{self.tag}")
        self.pods: list[Pod] = []
        self.processes: list[subprocess.Popen] = []
        self.workloads: list[Workload] = []
        self.agents: list[AgentProcess] = []
        self.api: FakeApiServer | None = None
        self.kubeconfig = ""
        self.shared: list[Path] = []

    # -- building --------------------------------------------------------------------------------

    def build(self) -> None:
        for ns in (self.netns, self.services):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "netns", "exec", self.netns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        sh("ip", "-n", self.netns, "link", "add", self.uplink, "type", "veth", "peer", "name", f"agt{self.tag}v",
           "netns", self.services)
        self._address(self.netns, self.uplink, f"{SERVICE_NET}.1/24")
        self._address(self.services, f"agt{self.tag}v", f"{SERVICE_NET}.2/24")
        sh("ip", "-n", self.netns, "route", "add", f"{CLUSTER_IPS}.0/24", "via", SERVICE_HOST)
        sh("ip", "-n", self.services, "route", "add", "10.201.0.0/16", "via", f"{SERVICE_NET}.1")
        self.kubepods.mkdir(parents=True)
        (self.kubepods / "kubepods-burstable.slice").mkdir()
        with inside(self.netns):  # the API server's socket lives where the agent runs
            self.api = FakeApiServer()
        self.api.__enter__()
        self.kubeconfig = kubeconfig(self.tmp / "kubeconfig", {"test": self.api}, "test")
        self.api.put_core({"apiVersion": "v1", "kind": "Node",
                           "metadata": {"name": NODE_NAME, "labels": {"kubernetes.io/hostname": NODE_NAME}}})

    def _address(self, ns: str, ifname: str, cidr: str) -> None:
        sh("ip", "-n", ns, "addr", "add", cidr, "dev", ifname)
        sh("ip", "-n", ns, "link", "set", ifname, "up")

    def pod(self, name: str, namespace: str = "shop", labels: dict | None = None, meshed: bool = True) -> Pod:
        """A Pod's network namespace and cgroups (not yet told to the API server: `publish`)."""
        slot = len(self.pods) + 1
        uid = str(uuid.uuid4())
        cgroup = self.kubepods / "kubepods-burstable.slice" / f"kubepods-burstable-pod{uid.replace('-', '_')}.slice"
        pod = Pod(name, namespace, slot, f"agt-{self.tag}-p{slot}", uid, cgroup, dict(labels or {}), meshed)
        self.pods.append(pod)
        sh("ip", "netns", "add", pod.netns)
        sh("ip", "-n", pod.netns, "link", "set", "lo", "up")
        host_side = f"agt{self.tag}{slot}"
        sh("ip", "-n", self.netns, "link", "add", host_side, "type", "veth", "peer", "name", "eth0",
           "netns", pod.netns)
        self._address(self.netns, host_side, f"10.201.{slot}.1/24")
        self._address(pod.netns, "eth0", f"{pod.ip}/24")
        sh("ip", "-n", pod.netns, "route", "add", "default", "via", f"10.201.{slot}.1")
        pod.container.mkdir(parents=True)
        return pod

    def publish(self, pod: Pod) -> None:
        assert self.api is not None
        self.api.put_core(pod.manifest())

    def unpublish(self, pod: Pod) -> None:
        assert self.api is not None
        self.api.delete("pods", pod.namespace, pod.name)

    def service(self, name: str, last_octet: int, port: int = 9080, namespace: str = "shop") -> str:
        """A Service whose ClusterIP exists on the services namespace's loopback; its address."""
        assert self.api is not None
        ip = f"{CLUSTER_IPS}.{last_octet}"
        sh("ip", "-n", self.services, "addr", "add", f"{ip}/32", "dev", "lo")
        self.api.put_core({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace},
                           "spec": {"clusterIP": ip, "ports": [{"port": port, "protocol": "TCP"}]}})
        return ip

    def start(self, argv: list[str], netns: str | None = None) -> subprocess.Popen:
        """A process that prints `ready` once it serves; killed on exit."""
        if netns is not None:
            argv = ["ip", "netns", "exec", netns, *argv]
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.processes.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready", f"{argv} did not start"
        return proc

    def workload(self, pod: Pod) -> Workload:
        """tests/integration/accel/workload.py as a process of the Pod (commands on stdin)."""
        workload = Workload(pod.argv(sys.executable, str(WORKLOAD)))
        self.workloads.append(workload)
        return workload

    def agent(self, *flags: str, ready: bool = True) -> AgentProcess:
        agent = AgentProcess(self, list(flags), self.tmp / f"agent-{len(self.agents)}.log")
        self.agents.append(agent)
        if ready:
            agent.wait_for_log("agent: ready")
        return agent

    def shared_dir(self, owner: int) -> Path:
        """A directory another UID (the sidecar's) can use: pytest's tmp_path is root's only."""
        path = Path(tempfile.mkdtemp(prefix=f"agt-{self.tag}-"))
        self.shared.append(path)
        path.chmod(0o755)
        os.chown(path, owner, owner)
        return path

    def remove_pod_cgroup(self, pod: Pod) -> None:
        """What the kubelet does when a Pod's containers are gone: its processes end, its cgroups go."""
        for cgroup in (pod.container, pod.cgroup):
            for pid in Cgroup(cgroup).pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            remove(Cgroup(cgroup))

    # -- tearing down ------------------------------------------------------------------------------

    def close(self) -> None:
        for agent in self.agents:
            if agent.process.poll() is None:
                agent.process.kill()
                agent.process.wait(timeout=30)
        for proc in self.processes:
            proc.kill()
            proc.wait(timeout=10)
        for workload in self.workloads:
            workload.close()
        if self.api is not None:
            self.api.__exit__(None, None, None)
        for pod in self.pods:
            with contextlib.suppress(OSError, Exception):
                self.remove_pod_cgroup(pod)
        for path in sorted(self.cgroup_base.rglob("*"), key=lambda p: -len(p.parts)) if self.cgroup_base.exists() \
                else ():
            if path.is_dir():
                with contextlib.suppress(Exception):
                    remove(Cgroup(path))
        with contextlib.suppress(Exception):
            remove(Cgroup(self.cgroup_base))
        shutil.rmtree(self.pin_base, ignore_errors=True)  # pins are files to bpffs: removing them unpins
        for path in self.shared:
            shutil.rmtree(path, ignore_errors=True)
        for ns in [pod.netns for pod in self.pods] + [self.netns, self.services]:
            sh("ip", "netns", "del", ns, check=False)


@contextlib.contextmanager
def cluster_node(tmp: Path) -> Iterator[Node]:
    node = Node(tmp)
    try:
        node.build()
        yield node
    finally:
        node.close()


HTTP_BACKENDS = r"""
import socket, sys, threading
def serve(name, host, port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((host, port)); s.listen(256)
    def loop():
        while True:
            c, _ = s.accept()
            threading.Thread(target=answer, args=(c, name), daemon=True).start()
    threading.Thread(target=loop, daemon=True).start()
def answer(c, name):
    with c:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = c.recv(4096)
            if not chunk:
                return
            data += chunk
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(name), name.encode()))
for spec in sys.argv[1:]:
    name, host, port = spec.split(",")
    serve(name, host, int(port))
print("ready", flush=True)
sys.stdin.read()
"""


CLIENT = r"""
import collections, json, socket, sys
host, ip, port, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
names, peers = collections.Counter(), set()
for _ in range(count):
    c = socket.create_connection((ip, port), timeout=10)
    peers.add("%s:%d" % c.getpeername())
    c.sendall(("GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % host).encode())
    data = b""
    while chunk := c.recv(4096):
        data += chunk
    c.close()
    names[data.split(b"\r\n\r\n", 1)[-1].decode()] += 1
print(json.dumps({"names": names, "peers": sorted(peers)}))
"""


def app(pod: Pod, host: str, ip: str, count: int) -> dict:
    """`count` new connections from the Pod's app (root, its cgroup: the iptables rules redirect it)."""
    result = subprocess.run(pod.argv(sys.executable, "-c", CLIENT, host, ip, "9080", str(count)),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)
