#!/usr/bin/env python3
"""A connection to a kernel-split host from an injected Pod, against the same connection through
the sidecar. Figures side by side; nothing is asserted.

The Pod is what injection makes of one here: a network namespace with `meshlet run` (the
sidecar) and the init container's iptables redirect, and a cgroup that the node agent's
connect4 hook is attached to (the agent's own KernelSplitter, in-process, with the Pod's
namespace scope). The Services are nginx on ClusterIPs in a second namespace behind a veth.
wrk is the Pod's app (in its cgroup and namespace, as another UID than the sidecar's, so the
redirect captures it) and sends to the Service `reviews` at its ClusterIP:

  kernel    dataplane kernel: connect4 rewrites the connect 90/10 to v1/v2 and marks it, the
            redirect lets it past the sidecar: app -> backend
  sidecar   the same policy in the proxy: app -> iptables REDIRECT -> sidecar 90/10 -> backend
  direct    the floor: app -> v1, past the redirect (as the sidecar's own UID would go)

for new connections (each request on its own connection, `Connection: close`: what a kernel
split changes most) and for keep-alive. Rounds alternate the order; medians are shown.

examples:
  sudo .venv/bin/python bench/agent_cluster_bench.py              # 3 rounds of 5 s
  sudo .venv/bin/python bench/agent_cluster_bench.py --quick      # 1 round of 2 s
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from harness.load import LoadResult, parse_wrk
from harness.procs import Service, wait_log
from harness.servers import nginx_conf

from meshlet.ebpf import capability
from meshlet.ebpf.cgroup import UNIFIED, Cgroup, remove
from meshlet.ebpf.kernel_split import KernelSplit, KernelSplitter, SplitBackend, namespace_scope
from meshlet.k8s.sidecar import InjectConfig, redirect_script
from meshlet.policy.model import Address

MESHLET = Path(sys.executable).parent / "meshlet"
NAMESPACE = "bench"
VIP, BACKENDS = "10.96.0.10", {"v1": "10.96.0.11", "v2": "10.96.0.12"}
PORT = 9080
WEIGHTS = {"v1": 90, "v2": 10}
SIDECAR = InjectConfig(uid=0)  # the sidecar runs as root here (so it can re-exec under -O); the app does not
APP_UID = 65534
SCENARIOS = (("new-conn-c1", 1, True), ("new-conn-c16", 16, True), ("keepalive-c16", 16, False))
CONFIGS = ("direct", "kernel", "sidecar")
POLICY = f"""\
apiVersion: meshlet.dev/v1alpha1
kind: TrafficPolicy
metadata: {{name: reviews, namespace: {NAMESPACE}}}
spec:
  host: reviews
  backends: {{v1: {{address: "{BACKENDS['v1']}:{PORT}"}}, v2: {{address: "{BACKENDS['v2']}:{PORT}"}}}}
  routes: [{{name: canary, to: [{{backend: v1, weight: {WEIGHTS['v1']}}}, {{backend: v2, weight: {WEIGHTS['v2']}}}]}}]
"""


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=30)


@dataclass
class Pod:
    tag: str
    work: Path

    @property
    def netns(self) -> str:
        return f"agt-bench-{self.tag}-pod"

    @property
    def services(self) -> str:
        return f"agt-bench-{self.tag}-svc"

    @property
    def cgroup(self) -> Path:
        return UNIFIED / f"agt-bench-{self.tag}" / "pod"

    @property
    def pin_dir(self) -> Path:
        return Path(f"/sys/fs/bpf/agt-bench-{self.tag}")

    def run(self, argv: list[str], uid: int = 0) -> list[str]:
        """argv as the Pod's app: its container cgroup (joined before `ip netns exec`, which hides
        the cgroup tree), its network namespace, its UID."""
        drop = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"] if uid else []
        return Cgroup(self.cgroup / "ctr").command(["ip", "netns", "exec", self.netns, *drop, *argv])


@contextlib.contextmanager
def pod_and_services(work: Path) -> Iterator[Pod]:
    pod = Pod(uuid.uuid4().hex[:6], work)
    try:
        for ns in (pod.netns, pod.services):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", pod.netns, "link", "add", "eth0", "type", "veth", "peer", "name", "svc0", "netns", pod.services)
        for ns, ifname, address in ((pod.netns, "eth0", "10.202.0.2/24"), (pod.services, "svc0", "10.202.0.1/24")):
            sh("ip", "-n", ns, "addr", "add", address, "dev", ifname)
            sh("ip", "-n", ns, "link", "set", ifname, "up")
        sh("ip", "-n", pod.netns, "route", "add", "default", "via", "10.202.0.1")
        for ip in (VIP, *BACKENDS.values()):
            sh("ip", "-n", pod.services, "addr", "add", f"{ip}/32", "dev", "lo")
        (pod.cgroup / "ctr").mkdir(parents=True)
        yield pod
    finally:
        for cgroup in (pod.cgroup / "ctr", pod.cgroup, pod.cgroup.parent):
            with contextlib.suppress(Exception):
                remove(Cgroup(cgroup))
        for ns in (pod.netns, pod.services):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        shutil.rmtree(pod.pin_dir, ignore_errors=True)


@contextlib.contextmanager
def started(name: str, argv: list[str], log: Path, ready: str | None = None,
            probe: tuple[str, str, int] | None = None) -> Iterator[Service]:
    """A process until the block ends; ready once `ready` is logged or `probe` (netns, ip, port) connects."""
    with log.open("wb") as out:
        service = Service(name, subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
    try:
        if ready:
            wait_log(log, ready, service.proc)
        if probe:
            connect = "import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 1).close()"
            deadline = time.monotonic() + 20
            while subprocess.run(["ip", "netns", "exec", probe[0], sys.executable, "-c", connect, probe[1],
                                  str(probe[2])], capture_output=True, timeout=30).returncode != 0:
                if time.monotonic() > deadline or service.proc.poll() is not None:
                    raise RuntimeError(f"{name} did not start: {log.read_text()[-500:]}")
                time.sleep(0.1)
        yield service
    finally:
        service.stop()


def wrk(pod: Pod, ip: str, connections: int, new_connections: bool, duration: float, uid: int) -> LoadResult:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency", "-H", "Host: reviews"]
    argv += ["-H", "Connection: close"] if new_connections else []
    result = subprocess.run(pod.run([*argv, f"http://{ip}:{PORT}/"], uid), capture_output=True, text=True,
                            timeout=duration + 60)
    if result.returncode != 0:
        raise RuntimeError(f"wrk failed: {result.stderr.strip()}")
    return parse_wrk(result.stdout)


def sidecar_requests(pod: Pod) -> float:
    read = ("import sys, urllib.request; t = urllib.request.urlopen(sys.argv[1], timeout=10).read().decode();"
            "print(sum(float(l.rsplit(' ', 1)[1]) for l in t.splitlines() if l.startswith('meshlet_requests_total{')))")
    url = f"http://127.0.0.1:{SIDECAR.admin_port}/metrics"
    out = subprocess.run(["ip", "netns", "exec", pod.netns, sys.executable, "-c", read, url], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    return float(out)


def the_split() -> KernelSplit:
    backends = tuple(SplitBackend("canary", name, Address(BACKENDS[name], PORT), w) for name, w in WEIGHTS.items())
    return KernelSplit("reviews", Address(VIP, PORT), backends, NAMESPACE, namespace_scope(NAMESPACE))


def table(results: dict[tuple[str, str], list[LoadResult]]) -> str:
    lines = [f"{'scenario':<15} {'path':<8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'+p50 ms':>8} "
             f"{'x sidecar':>9} {'errors':>6}", "-" * 78]
    for scenario, _, _ in SCENARIOS:
        rows = {config: results[scenario, config] for config in CONFIGS}
        med = {c: (statistics.median(r.rps for r in rs), statistics.median(r.p50 for r in rs),
                   statistics.median(r.p99 for r in rs), sum(r.errors for r in rs)) for c, rs in rows.items()}
        for config in CONFIGS:
            rps, p50, p99, errors = med[config]
            added = "-" if config == "direct" else f"{(p50 - med['direct'][1]) * 1e3:.2f}"
            lines.append(f"{scenario:<15} {config:<8} {rps:>8.0f} {p50 * 1e3:>8.2f} {p99 * 1e3:>8.2f} {added:>8} "
                         f"{rps / med['sidecar'][0]:>9.2f} {errors:>6}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are reported")
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.duration = 1, 2.0
    problem = capability.missing(capability.probe())
    for tool in ("wrk", "nginx", "ip", "iptables", "setpriv"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            problem = problem or f"{tool} is not installed (scripts/setup installs it)"
    if problem:
        print(f"agent_cluster_bench: {problem}", file=sys.stderr)
        return 1

    results: dict[tuple[str, str], list[LoadResult]] = {(s, c): [] for s, _, _ in SCENARIOS for c in CONFIGS}
    with tempfile.TemporaryDirectory(prefix="agt-bench-") as tmp, pod_and_services(Path(tmp)) as pod, \
            contextlib.ExitStack() as stack:
        work = Path(tmp)
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        conf = nginx_conf(work, dict.fromkeys(BACKENDS, PORT), hosts=BACKENDS)
        stack.enter_context(started("nginx", ["ip", "netns", "exec", pod.services, nginx, "-c", str(conf), "-p",
                                              str(work)], work / "nginx.log", probe=(pod.netns, BACKENDS["v1"], PORT)))
        (work / "policy.yaml").write_text(POLICY)
        sidecar = [str(MESHLET), "run", "--policy", str(work / "policy.yaml"), "--workers", "1",
                   "--outbound", f"127.0.0.1:{SIDECAR.outbound_port}", "--inbound", f"0.0.0.0:{SIDECAR.inbound_port}",
                   "--admin", f"127.0.0.1:{SIDECAR.admin_port}"]
        stack.enter_context(started("sidecar", pod.run(sidecar), work / "sidecar.log", ready="ready outbound="))
        sh("ip", "netns", "exec", pod.netns, "/bin/sh", "-c", redirect_script(SIDECAR))
        splitter = KernelSplitter(pod.pin_dir / "split")
        stack.callback(splitter.stop)
        splitter.start()
        splitter.set_targets({pod.cgroup: namespace_scope(NAMESPACE)})
        through_sidecar_in_kernel_runs = 0.0
        for round_ in range(args.rounds):
            order = CONFIGS if round_ % 2 == 0 else tuple(reversed(CONFIGS))
            for scenario, connections, new in SCENARIOS:
                for config in order:
                    print(f"round {round_ + 1}/{args.rounds} {scenario} {config}", file=sys.stderr)
                    splitter.apply([the_split()] if config == "kernel" else [])
                    before = sidecar_requests(pod)
                    target, uid = (BACKENDS["v1"], 0) if config == "direct" else (VIP, APP_UID)
                    results[scenario, config].append(wrk(pod, target, connections, new, args.duration, uid))
                    if config == "kernel":
                        through_sidecar_in_kernel_runs += sidecar_requests(pod) - before
        kernel_connections = sum(splitter.connections().values())
    print(f"wrk -t1, {args.rounds} rounds of {args.duration:g} s, medians; `x sidecar`: throughput over the sidecar's")
    print(table(results))
    print(f"sanity: connect4 rewrote {kernel_connections} connections; the sidecar counted "
          f"{through_sidecar_in_kernel_runs:.0f} requests during the kernel runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
