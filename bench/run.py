#!/usr/bin/env python3
"""meshlet's benchmark: direct vs HAProxy vs meshlet, measured alternately in one run.

Every target relays to the same nginx backends (v1, v2) with the same 90/10 split; each round
measures every target once per scenario (the order reversed every other round), so machine
drift hits all of them alike, and the table shows the median of the rounds.

  direct           wrk -> nginx v1 (the floor)
  haproxy          wrk -> HAProxy 90/10 (the reference proxy)
  meshlet-1w       wrk -> `meshlet run --workers 1`; meshlet-workers: the default --workers (CPU count)
  meshlet-2hop     wrk -> sidecar A outbound -> plaintext -> sidecar B inbound -> nginx (1 worker each)
  meshlet-mtls     the same two sidecars with `tls: mesh` and identities from `meshlet ca`/`meshlet cert`
  meshlet-accel    meshlet-1w with `meshlet agent --accelerate` on a cgroup holding wrk and the sidecar
  kernel-split     no proxy: `meshlet agent` splits connects to the policy's `spec.vip` (dataplane: kernel)

The last two need root and BPF; a target that cannot start is listed as `unavailable: reason`.
CPU and RSS are the target's whole process tree (both sidecars for the two-hop targets; the
agent is not charged: it does no per-request work in user space).

examples:
  make bench                                   # all targets, 3 rounds of 5 s per scenario
  .venv/bin/python bench/run.py --quick        # 1 round of 2 s: a smoke run
  .venv/bin/python bench/run.py --targets direct,haproxy,meshlet-1w
  .venv/bin/python bench/run.py --profile meshlet-1w   # also a py-spy flame graph into results/
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from harness import load, report
from harness.procs import Service, cpu_seconds, free_port, peak_rss_bytes, peak_rss_each, service
from harness.servers import haproxy_conf, meshlet_policy, start_backends
from harness.workload import Workload, agent_counter

REPO = Path(__file__).resolve().parents[1]
MESHLET = REPO / ".venv" / "bin" / "meshlet"
SPLIT = {"v1": 90, "v2": 10}
FRONTEND = "spiffe://cluster.local/ns/bench/sa/frontend"
REVIEWS = "spiffe://cluster.local/ns/bench/sa/reviews"


@dataclass
class Target:
    name: str
    port: int
    host: str | None  # Host header to send (the sidecar routes by it)
    services: list[Service]
    workload: Workload | None = None  # the cgroup the load generator must run in (eBPF targets)
    worker_count: int = 0  # proxy worker processes (for RSS per worker)
    evidence: Callable[[], str] | None = None  # what the eBPF hooks did (so a figure is not a silent no-op)

    def pids(self) -> list[int]:
        return [pid for svc in self.services for pid in svc.pids()]


Starter = Callable[[contextlib.ExitStack, Path, dict[str, int]], Target]


def start_direct(stack: contextlib.ExitStack, work: Path, backends: dict[str, int]) -> Target:
    return Target("direct", backends["v1"], None, [])


def start_haproxy(stack: contextlib.ExitStack, work: Path, backends: dict[str, int]) -> Target:
    port = free_port()
    conf = haproxy_conf(work, port, {name: (backends[name], w) for name, w in SPLIT.items()})
    svc = stack.enter_context(service("haproxy", ["haproxy", "-db", "-f", str(conf)], [port], work / "haproxy.log"))
    return Target("haproxy", port, None, [svc])


def sidecar(
    stack: contextlib.ExitStack, work: Path, name: str, policy: Path, workers: int | None = 1,
    identity: Path | None = None, app: int | None = None, wrap: Callable[[list[str]], list[str]] = list,
) -> tuple[Service, dict[str, int]]:
    """`meshlet run` on fresh loopback ports, started (and stopped) on the stack."""
    ports = {"outbound": free_port(), "inbound": free_port(), "admin": free_port()}
    argv = [str(MESHLET), "run", "--policy", str(policy)] + [f"--{k}=127.0.0.1:{p}" for k, p in ports.items()]
    argv += ["--workers", str(workers)] if workers else []
    argv += ["--identity", str(identity)] if identity else []
    argv += ["--app", f"127.0.0.1:{app}"] if app else []
    svc = stack.enter_context(service(name, wrap(argv), list(ports.values()), work / f"{name}.log"))
    return svc, ports


def meshlet_starter(workers: int | None) -> Starter:
    def start(stack: contextlib.ExitStack, work: Path, backends: dict[str, int]) -> Target:
        name = f"meshlet-{workers or os.cpu_count()}w"
        (work / name).mkdir()
        policy = meshlet_policy(work / name, {n: (backends[n], w) for n, w in SPLIT.items()})
        svc, ports = sidecar(stack, work, name, policy, workers)
        return Target(name, ports["outbound"], "reviews", [svc], worker_count=workers or os.cpu_count() or 1)

    return start


def baseline_starter(rev: str) -> Starter:
    """meshlet as committed at `rev` (default workers), to measure a change before/after in one run."""

    def start(stack: contextlib.ExitStack, work: Path, backends: dict[str, int]) -> Target:
        name = f"meshlet-{rev}-{os.cpu_count()}w"
        tree = work / name
        tree.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "meshlet"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
        policy = meshlet_policy(tree, {n: (backends[n], w) for n, w in SPLIT.items()})
        # Run from the tree: with `-c` the working directory comes first on sys.path, so starting
        # in the repo would import the repo's meshlet (editable install) instead of the tree's.
        python = ["env", "-C", str(tree), f"PYTHONPATH={tree}", sys.executable, "-c",
                  "import sys; from meshlet.cli import main; sys.exit(main())"]
        svc, ports = sidecar(stack, work, name, policy, workers=None, wrap=lambda argv: python + argv[1:])
        return Target(name, ports["outbound"], "reviews", [svc], worker_count=os.cpu_count() or 1)

    return start


def two_hop_starter(mtls: bool) -> Starter:
    """Client sidecar A splits 90/10 (both weights to B: only the hop differs) -> server sidecar B -> nginx v1."""

    def start(stack: contextlib.ExitStack, work: Path, backends: dict[str, int]) -> Target:
        name = "meshlet-mtls" if mtls else "meshlet-2hop"
        (work / name).mkdir()
        ids = identities(work / name) if mtls else {}
        for side in ("a", "b"):
            (work / name / side).mkdir(exist_ok=True)
        strict = f'mtls: {{mode: STRICT, allow: ["{FRONTEND}"]}}' if mtls else ""
        server = meshlet_policy(work / name / "b", {"self": (9, 100)}, spec=strict)
        b, b_ports = sidecar(stack, work, f"{name}-b", server, identity=ids.get("b"), app=backends["v1"])
        hop = {n: (b_ports["inbound"], w) for n, w in SPLIT.items()}
        client = meshlet_policy(work / name / "a", hop, **({"tls": "mesh", "identity": REVIEWS} if mtls else {}))
        a, a_ports = sidecar(stack, work, f"{name}-a", client, identity=ids.get("a"))
        return Target(name, a_ports["outbound"], "reviews", [a, b], worker_count=1)

    return start


def identities(work: Path) -> dict[str, Path]:
    """A mesh CA and two workload identities, made the way users make them (`meshlet ca`, `meshlet cert`)."""
    run = functools.partial(subprocess.run, check=True, capture_output=True, timeout=60)
    run([str(MESHLET), "ca", "init", "--dir", str(work / "ca")])
    for side, spiffe in (("a", FRONTEND), ("b", REVIEWS)):
        run([str(MESHLET), "cert", "issue", "--ca", str(work / "ca"), "--spiffe", spiffe, "--out", str(work / side)])
    return {"a": work / "a", "b": work / "b"}


def accel_starter(stack: contextlib.ExitStack, work: Path, backends: dict[str, int]) -> Target:
    """meshlet-1w and wrk in one cgroup, their loopback sockets redirected by the agent's sk_msg program."""
    workload = Workload.enter(stack, "accel")
    (work / "meshlet-accel").mkdir()
    policy = meshlet_policy(work / "meshlet-accel", {n: (backends[n], w) for n, w in SPLIT.items()})
    svc, ports = sidecar(stack, work, "meshlet-accel", policy, wrap=workload.cgroup.command)
    agent = workload.agent(stack, work, ["--accelerate", "--sidecar-ports", str(ports["outbound"])])

    def evidence() -> str:
        return f"sk_msg redirected {agent_counter(agent, 'meshlet_accel_redirected_bytes_total') / 1024:.0f} KiB"

    return Target("meshlet-accel", ports["outbound"], "reviews", [svc], workload, 1, evidence)


def kernel_split_starter(stack: contextlib.ExitStack, work: Path, backends: dict[str, int]) -> Target:
    """No proxy: connects from the cgroup to the policy's VIP are sent to v1/v2 90/10 by connect4."""
    workload = Workload.enter(stack, "split")
    (work / "kernel-split").mkdir()
    vip = free_port()
    spec = f'dataplane: kernel\nvip: "127.0.0.1:{vip}"'
    policy = meshlet_policy(work / "kernel-split", {n: (backends[n], w) for n, w in SPLIT.items()}, spec=spec)
    agent = workload.agent(stack, work, ["--policy", str(policy)])

    def evidence() -> str:
        return f"connect4 rewrote {agent_counter(agent, 'meshlet_kernel_connections_total'):.0f} connections"

    return Target("kernel-split", vip, None, [], workload, evidence=evidence)


TARGETS: dict[str, Starter] = {
    "direct": start_direct,
    "haproxy": start_haproxy,
    "meshlet-1w": meshlet_starter(1),
    "meshlet-workers": meshlet_starter(None),
    "meshlet-2hop": two_hop_starter(mtls=False),
    "meshlet-mtls": two_hop_starter(mtls=True),
    "meshlet-accel": accel_starter,
    "kernel-split": kernel_split_starter,
}


def measure(target: Target, scenario: str, duration: float) -> report.Row:
    pids = target.pids()
    cpu_before = cpu_seconds(pids)
    with target.workload.inside() if target.workload else contextlib.nullcontext():
        result = generate(target, scenario, duration)
    cpu = cpu_seconds(pids) - cpu_before
    return report.Row(
        target.name, scenario, result.rps, result.p50, result.p90, result.p99, result.errors,
        cpu_per_1k=(1000 * cpu / result.requests) if pids and result.requests else None,
        peak_rss_mb=peak_rss_bytes(pids) / 2**20 if pids else None,
        largest_rss_mb=max(peak_rss_each(pids), default=0) / 2**20 if pids else None,
    )


def generate(target: Target, scenario: str, duration: float) -> load.LoadResult:
    url = f"http://127.0.0.1:{target.port}/"
    if scenario == "wrk-c1":
        return load.wrk(url, 1, duration, target.host)
    if scenario == "wrk-c16":
        return load.wrk(url, 16, duration, target.host)
    return load.fixed_rate(target.port, 500, duration, host=target.host or "localhost")


def profile(target: Target, results: Path, duration: float) -> Path:
    """A py-spy flame graph (SVG) of the target's processes while wrk -c16 loads it."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not target.services or not Path(spy).exists():
        raise RuntimeError(f"cannot profile {target.name}: " + ("not a process" if Path(spy).exists() else
                           "py-spy is missing (pip install -e '.[bench]')"))
    results.mkdir(parents=True, exist_ok=True)
    out = results / f"flame-{target.name}.svg"
    argv = [spy, "record", "--pid", str(target.services[0].proc.pid), "--subprocesses", "--rate", "100",
            "--duration", f"{duration + 1:g}", "--output", str(out)]
    with subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as spying:
        generate(target, "wrk-c16", duration)
        _, err = spying.communicate(timeout=duration + 60)
    if spying.returncode:
        # py-spy ends its message with a Rust backtrace: the line naming the error is the one to show.
        lines = err.strip().splitlines() or ["?"]
        raise RuntimeError(f"py-spy failed: {next((line for line in lines if line.startswith('Error')), lines[-1])}")
    return out


def _evidence(target: Target) -> str:
    assert target.evidence is not None
    try:
        return target.evidence()
    except (OSError, ValueError) as e:
        return f"cannot read the agent's metrics: {e}"


def _first_line(e: BaseException) -> str:
    stderr = getattr(e, "stderr", None)  # a failed `meshlet ca`/`cert` says why on stderr
    text = (stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr or "") or str(e)
    return (text.strip().splitlines() or [type(e).__name__])[-1 if stderr else 0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, of: {', '.join(TARGETS)}")
    parser.add_argument("--scenarios", default="wrk-c1,wrk-c16,rate-500", help="wrk-c1, wrk-c16, rate-500")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median is reported")
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--baseline", metavar="REV", help="also measure meshlet as committed at git REV "
                        "(default workers), e.g. HEAD: before/after a change in one run")
    parser.add_argument("--profile", metavar="TARGET", help="after the rounds, a py-spy flame graph of TARGET "
                        "under wrk -c16 into RESULTS/flame-TARGET.svg (e.g. meshlet-1w)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.duration = 1, 2.0
    for tool in ("wrk", "nginx", "haproxy"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            print(f"bench: {tool} is not installed; run `make bench` (it installs everything)", file=sys.stderr)
            return 1
    names = [t for t in args.targets.split(",") if t]
    if args.baseline:
        TARGETS["baseline"] = baseline_starter(args.baseline)
        names.append("baseline")
    unknown = [t for t in names if t not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s): {', '.join(unknown)}")
    scenarios = args.scenarios.split(",")

    samples: dict[tuple[str, str], list[report.Row]] = {}
    unavailable: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="meshlet-bench-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        backends = start_backends(stack, work)
        targets: dict[str, Target] = {}  # by target key (meshlet-workers runs as meshlet-2w)
        for name in names:
            try:
                targets[name] = TARGETS[name](stack, work, backends)
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                unavailable[name] = _first_line(e)
                print(f"{name}: unavailable: {unavailable[name]}", file=sys.stderr)
        for round_ in range(args.rounds):
            for scenario in scenarios:
                for target in list(targets.values())[:: 1 if round_ % 2 == 0 else -1]:
                    print(f"round {round_ + 1}/{args.rounds} {scenario:<9} {target.name}", file=sys.stderr)
                    try:
                        row = measure(target, scenario, args.duration)
                    except (subprocess.SubprocessError, ValueError, OSError) as e:
                        unavailable[target.name] = f"{scenario} failed: {str(e).splitlines()[0]}"
                        continue
                    samples.setdefault((target.name, scenario), []).append(row)
        evidence = {t.name: _evidence(t) for t in targets.values() if t.evidence}
        profiled = [t for key, t in targets.items() if args.profile in (key, t.name)]
        if args.profile and not profiled:
            print(f"bench: --profile {args.profile}: no such target was started", file=sys.stderr)
        for target in profiled:
            print(f"profiling {target.name} (py-spy, wrk -c16)", file=sys.stderr)
            try:
                print(f"flame graph: {profile(target, args.results, args.duration)}", file=sys.stderr)
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                print(f"bench: {e}", file=sys.stderr)

    rows = [report.median_rows(s) for s in samples.values()]
    order = [t.name for t in targets.values()]
    rows.sort(key=lambda r: (scenarios.index(r.scenario), order.index(r.target)))
    print(report.table(rows, unavailable))
    for name, what in evidence.items():
        print(f"{name}: {what}")
    default = targets["meshlet-workers"].name if "meshlet-workers" in targets else None
    print(report.goals(rows, default, [t.name for t in targets.values() if t.worker_count]))
    report.write(args.results, rows, unavailable,
                 {"rounds": args.rounds, "duration_s": args.duration, "split": SPLIT, "scenarios": scenarios,
                  "evidence": evidence})
    print(f"\nwrote {args.results / 'latest.json'} and {args.results / 'latest.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
