"""The targets a benchmark run measures, started on the run's ExitStack (and stopped by it).

Like is compared with like: HAProxy runs with `nbthread 1` and `nbthread 2`, meshlet with
`--workers 1` and `--workers 2`, and a target's `threads` names the HAProxy it is set against.
The composed targets (two hops, mTLS, sockmap) run on the engine the run was given.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from harness.procs import Service, free_port, rss_each, service, tree
from harness.servers import haproxy_conf, meshlet_policy
from harness.workload import Workload, agent_counter

REPO = Path(__file__).resolve().parents[2]
MESHLET = Path(sys.executable).with_name("meshlet")
SPLIT = {"v1": 90, "v2": 10}
FRONTEND = "spiffe://cluster.local/ns/bench/sa/frontend"
REVIEWS = "spiffe://cluster.local/ns/bench/sa/reviews"
SHORT = {"lean": "lean", "mitmproxy": "mitm"}  # `--engine` → its name in target names
WARM_CONNECTIONS = 16  # before idle RSS: enough connections that SO_REUSEPORT reaches every worker


@dataclass(frozen=True)
class Run:
    """What every starter is given: where to keep files, the backends, the engine of composed targets."""

    stack: contextlib.ExitStack
    work: Path
    backends: dict[str, int]
    engine: str = "lean"

    def split(self, to: dict[str, int] | None = None) -> dict[str, tuple[int, int]]:
        """The 90/10 split as name → (port, weight), to the backends or to other ports by name."""
        ports = to or self.backends
        return {name: (ports[name], weight) for name, weight in SPLIT.items()}

    def directory(self, name: str) -> Path:
        path = self.work / name
        path.mkdir(parents=True, exist_ok=True)
        return path


@dataclass
class Target:
    name: str
    port: int
    host: str | None  # Host header to send (the sidecar routes by it)
    services: list[Service]
    workload: Workload | None = None  # the cgroup the load generator must run in (eBPF targets)
    threads: int = 1  # worker processes or HAProxy threads: compared with haproxy-{threads}t
    workers: int = 0  # worker processes per meshlet sidecar (0: not a meshlet sidecar)
    evidence: Callable[[], str] | None = None  # what the eBPF hooks did (so a figure is not a silent no-op)

    def pids(self) -> list[int]:
        return [pid for svc in self.services for pid in svc.pids()]

    def worker_pids(self) -> list[int]:
        """The processes that serve requests: a 1-worker sidecar itself, else its worker children."""
        if self.workers == 1:
            return [svc.proc.pid for svc in self.services]
        return [pid for svc in self.services for pid in tree(svc.proc.pid) if pid != svc.proc.pid]

    def idle_rss_mib(self) -> float | None:
        """The largest worker's resident set after start and a few requests (imports done, the
        upstream pool filled), before any load: what a sidecar costs a Pod while it waits."""
        if not self.workers:
            return None
        for _ in range(WARM_CONNECTIONS):
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                conn.request("GET", "/", headers={"Host": self.host or "localhost"})
                response = conn.getresponse()
                body = response.read()
                if response.status != 200:
                    raise RuntimeError(f"a warm-up request got {response.status}: {body[:200]!r}")
            finally:
                conn.close()
        return max(rss_each(self.worker_pids()), default=0) / 2**20 or None


Starter = Callable[[Run], Target]


def start_direct(run: Run) -> Target:
    return Target("direct", run.backends["v1"], None, [])


def haproxy_starter(threads: int) -> Starter:
    def start(run: Run) -> Target:
        name, port = f"haproxy-{threads}t", free_port()
        conf = haproxy_conf(run.directory(name), port, run.split(), threads)
        svc = run.stack.enter_context(service(name, ["haproxy", "-db", "-f", str(conf)], [port],
                                              run.work / f"{name}.log"))
        return Target(name, port, None, [svc], threads=threads)

    return start


def sidecar(
    run: Run, name: str, policy: Path, engine: str, workers: int = 1, identity: Path | None = None,
    app: int | None = None, wrap: Callable[[list[str]], list[str]] = list,
) -> tuple[Service, dict[str, int]]:
    """`meshlet run` on fresh loopback ports, started (and stopped) on the run's stack."""
    ports = {"outbound": free_port(), "inbound": free_port(), "admin": free_port()}
    argv = [str(MESHLET), "run", "--policy", str(policy)] + [f"--{k}=127.0.0.1:{p}" for k, p in ports.items()]
    argv += ["--workers", str(workers)] + (["--engine", engine] if engine else [])
    argv += ["--identity", str(identity)] if identity else []
    argv += ["--app", f"127.0.0.1:{app}"] if app else []
    svc = run.stack.enter_context(service(name, wrap(argv), list(ports.values()), run.work / f"{name}.log"))
    return svc, ports


def meshlet_starter(engine: str, workers: int) -> Starter:
    def start(run: Run) -> Target:
        name = f"meshlet-{SHORT[engine]}-{workers}w"
        policy = meshlet_policy(run.directory(name), run.split())
        svc, ports = sidecar(run, name, policy, engine, workers)
        return Target(name, ports["outbound"], "reviews", [svc], threads=workers, workers=workers)

    return start


def baseline_starter(rev: str) -> Starter:
    """meshlet as committed at `rev` with 1 worker (and the run's engine, if `rev` has engines):
    a change measured before/after in one run, beside meshlet-ENGINE-1w."""

    def start(run: Run) -> Target:
        name = f"meshlet-{rev}-1w"
        tree_dir = run.directory(name)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "meshlet"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(tree_dir)], input=archive.stdout, check=True)
        policy = meshlet_policy(tree_dir, run.split())
        # Run from the tree: with `-c` the working directory comes first on sys.path, so starting
        # in the repo would import the repo's meshlet (editable install) instead of the tree's.
        python = ["env", "-C", str(tree_dir), f"PYTHONPATH={tree_dir}", sys.executable, "-c",
                  "import sys; from meshlet.cli import main; sys.exit(main())"]
        run_py = tree_dir / "meshlet" / "commands" / "run.py"
        has_engines = run_py.exists() and "--engine" in run_py.read_text(errors="replace")
        svc, ports = sidecar(run, name, policy, run.engine if has_engines else "", 1,
                             wrap=lambda argv: python + argv[1:])
        return Target(name, ports["outbound"], "reviews", [svc], workers=1)

    return start


def two_hop_starter(mtls: bool) -> Starter:
    """Client sidecar A splits 90/10 (both weights to B: only the hop differs) -> server sidecar B -> nginx v1."""

    def start(run: Run) -> Target:
        name = f"meshlet-{SHORT[run.engine]}-{'mtls' if mtls else '2hop'}"
        ids = identities(run.directory(name)) if mtls else {}
        strict = f'mtls: {{mode: STRICT, allow: ["{FRONTEND}"]}}' if mtls else ""
        server = meshlet_policy(run.directory(f"{name}/b"), {"self": (9, 100)}, spec=strict)
        b, b_ports = sidecar(run, f"{name}-b", server, run.engine, identity=ids.get("b"), app=run.backends["v1"])
        hop = run.split({n: b_ports["inbound"] for n in SPLIT})
        mesh = {"tls": "mesh", "identity": REVIEWS} if mtls else {}
        client = meshlet_policy(run.directory(f"{name}/a"), hop, **mesh)
        a, a_ports = sidecar(run, f"{name}-a", client, run.engine, identity=ids.get("a"))
        return Target(name, a_ports["outbound"], "reviews", [a, b], workers=1)

    return start


def identities(work: Path) -> dict[str, Path]:
    """A mesh CA and two workload identities, made the way users make them (`meshlet ca`, `meshlet cert`)."""
    run = functools.partial(subprocess.run, check=True, capture_output=True, timeout=60)
    run([str(MESHLET), "ca", "init", "--dir", str(work / "ca")])
    for side, spiffe in (("a", FRONTEND), ("b", REVIEWS)):
        run([str(MESHLET), "cert", "issue", "--ca", str(work / "ca"), "--spiffe", spiffe, "--out", str(work / side)])
    return {"a": work / "a", "b": work / "b"}


def start_accel(run: Run) -> Target:
    """A 1-worker sidecar and wrk in one cgroup, their loopback sockets redirected by the agent's sk_msg program."""
    workload = Workload.enter(run.stack, "accel")
    name = f"meshlet-{SHORT[run.engine]}-accel"
    policy = meshlet_policy(run.directory(name), run.split())
    svc, ports = sidecar(run, name, policy, run.engine, wrap=workload.cgroup.command)
    agent = workload.agent(run.stack, run.work, ["--accelerate", "--sidecar-ports", str(ports["outbound"])])

    def evidence() -> str:
        return f"sk_msg redirected {agent_counter(agent, 'meshlet_accel_redirected_bytes_total') / 1024:.0f} KiB"

    return Target(name, ports["outbound"], "reviews", [svc], workload, workers=1, evidence=evidence)


def start_kernel_split(run: Run) -> Target:
    """No proxy (so no engine): connects from the cgroup to the policy's VIP are sent to v1/v2 90/10 by connect4."""
    workload = Workload.enter(run.stack, "split")
    vip = free_port()
    spec = f'dataplane: kernel\nvip: "127.0.0.1:{vip}"'
    policy = meshlet_policy(run.directory("kernel-split"), run.split(), spec=spec)
    agent = workload.agent(run.stack, run.work, ["--policy", str(policy)])

    def evidence() -> str:
        return f"connect4 rewrote {agent_counter(agent, 'meshlet_kernel_connections_total'):.0f} connections"

    return Target("kernel-split", vip, None, [], workload, evidence=evidence)


# In table order: each HAProxy before the meshlet targets of its thread count.
TARGETS: dict[str, Starter] = {
    "direct": start_direct,
    "haproxy-1t": haproxy_starter(1),
    "meshlet-lean-1w": meshlet_starter("lean", 1),
    "meshlet-mitm-1w": meshlet_starter("mitmproxy", 1),
    "haproxy-2t": haproxy_starter(2),
    "meshlet-lean-2w": meshlet_starter("lean", 2),
    "meshlet-mitm-2w": meshlet_starter("mitmproxy", 2),
    "meshlet-2hop": two_hop_starter(mtls=False),
    "meshlet-mtls": two_hop_starter(mtls=True),
    "meshlet-accel": start_accel,
    "kernel-split": start_kernel_split,
}
