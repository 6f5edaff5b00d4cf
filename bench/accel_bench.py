#!/usr/bin/env python3
"""eBPF acceleration figures, side by side: sockmap off vs on, and a proxy's split vs connect4.

Everything (nginx backends v1/v2, HAProxy as the sidecar, wrk as the app) runs inside one
cgroup made for the run, which is what the hooks attach to. Each round measures every
configuration once, alternating the order, and the table shows medians of the rounds:

  direct            wrk -> nginx v1                        (the floor: no proxy at all)
  proxy             wrk -> HAProxy 90/10 -> nginx v1/v2     (a sidecar on the path, plain TCP stack)
  proxy+sockmap     the same, both loopback hops redirected by sk_msg
  connect4          wrk -> VIP, rewritten 90/10 at connect() to nginx v1/v2: no proxy in the path
  meshlet[+sockmap] with --with-meshlet: meshlet's own sidecar (`meshlet run --workers 1`) as the proxy

"Proxy-layer overhead" is a configuration's p50 (or mean time per request) above direct; the
cut is how much of the proxy's overhead a configuration removes. The seed's production figure
was a 35% cut; the ratio column compares with it. Figures only: nothing here is asserted.

examples:
  sudo .venv/bin/python bench/accel_bench.py                 # 3 rounds of 5 s
  sudo .venv/bin/python bench/accel_bench.py --quick         # 1 round of 2 s
  sudo .venv/bin/python bench/accel_bench.py --with-meshlet  # add meshlet's sidecar, off and on
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from harness import load
from harness.procs import free_port, service
from harness.servers import haproxy_conf, meshlet_policy, nginx_conf

from meshlet.ebpf import capability, cgroup
from meshlet.ebpf.accel import SockmapAccelerator
from meshlet.ebpf.kernel_split import KernelSplit, KernelSplitter, SplitBackend
from meshlet.policy.model import Address

SEED_CUT = 0.35
SPLIT = {"v1": 90, "v2": 10}
CONFIGS = ("direct", "proxy", "proxy+sockmap", "connect4")
MESHLET_CONFIGS = ("meshlet", "meshlet+sockmap")
MESHLET = Path(sys.executable).parent / "meshlet"


@dataclass(frozen=True)
class Sample:
    rps: float
    p50: float
    p99: float
    errors: int


@dataclass
class Bench:
    work: Path
    cg: cgroup.Cgroup
    pin_root: Path
    backends: dict[str, int]
    proxy_port: int
    vip_port: int
    connections: int
    duration: float
    redirected_bytes: int = 0
    kernel_connections: int = 0

    def wrk(self, port: int, host: str | None = None) -> Sample:
        result = load.wrk(f"http://127.0.0.1:{port}/", self.connections, self.duration, host)
        return Sample(result.rps, result.p50, result.p99, result.errors)

    def direct(self) -> Sample:
        return self.wrk(self.backends["v1"])

    def sidecar(self, kind: str, accelerate: bool) -> Sample:
        """wrk -> a fresh sidecar (HAProxy or `meshlet run`) 90/10 -> nginx, sockmap off or on.

        Fresh per run: its backend connections must not outlive the run's mode."""
        accel = SockmapAccelerator({self.proxy_port, *self.backends.values()}, self.pin_root / "accel")
        split = {n: (self.backends[n], w) for n, w in SPLIT.items()}
        with contextlib.ExitStack() as stack:
            if accelerate:
                stack.callback(accel.stop, drain=2.0)
                accel.start()
                accel.set_targets([self.cg.path])
            if kind == "haproxy":
                conf = haproxy_conf(self.work, self.proxy_port, split)
                argv, ports, host = [shutil.which("haproxy") or "/usr/sbin/haproxy", "-db", "-f", str(conf)], [], None
            else:
                admin = free_port()
                argv = [str(MESHLET), "run", "--policy", str(meshlet_policy(self.work, split)), "--workers", "1",
                        "--outbound", f"127.0.0.1:{self.proxy_port}", "--inbound", f"127.0.0.1:{free_port()}",
                        "--admin", f"127.0.0.1:{admin}"]  # fmt: skip
                ports, host = [admin], "reviews"
            log = self.work / f"{kind}.log"
            stack.enter_context(service(kind, argv, [self.proxy_port, *ports], log))
            before = accel.stats().redirected_bytes if accelerate else 0
            sample = self.wrk(self.proxy_port, host)
            if accelerate:
                self.redirected_bytes += accel.stats().redirected_bytes - before
        return sample

    def connect4(self) -> Sample:
        splitter = KernelSplitter(self.pin_root / "split")
        backends = tuple(SplitBackend("canary", n, Address("127.0.0.1", self.backends[n]), w) for n, w in SPLIT.items())
        try:
            splitter.start()
            splitter.set_targets({self.cg.path: 0})
            splitter.apply([KernelSplit("reviews", Address("127.0.0.1", self.vip_port), backends)])
            sample = self.wrk(self.vip_port)
            self.kernel_connections += sum(splitter.connections().values())
        finally:
            splitter.stop()
        return sample


def median(samples: list[Sample]) -> Sample:
    return Sample(
        statistics.median(s.rps for s in samples),
        statistics.median(s.p50 for s in samples),
        statistics.median(s.p99 for s in samples),
        sum(s.errors for s in samples),
    )


def cut(base: Sample, slow: Sample, fast: Sample) -> tuple[float, float]:
    """Share of `slow`'s overhead over `base` that `fast` removes: by p50, and by mean time per request."""
    by_p50 = 1 - (fast.p50 - base.p50) / (slow.p50 - base.p50) if slow.p50 > base.p50 else float("nan")
    mean = [1 / s.rps for s in (base, slow, fast)]
    by_mean = 1 - (mean[2] - mean[0]) / (mean[1] - mean[0]) if mean[1] > mean[0] else float("nan")
    return by_p50, by_mean


def report(rows: dict[str, Sample], bench: Bench) -> str:
    direct = rows["direct"]
    lines = [
        f"{'configuration':<15} {'req/s':>9} {'p50 µs':>8} {'p99 µs':>8} {'+p50 µs':>8} {'errors':>6}",
        "-" * 60,
    ]
    for name, s in rows.items():
        added = f"{(s.p50 - direct.p50) * 1e6:8.0f}" if name != "direct" else f"{'-':>8}"
        lines.append(f"{name:<15} {s.rps:>9.0f} {s.p50 * 1e6:>8.0f} {s.p99 * 1e6:>8.0f} {added} {s.errors:>6}")
    lines.append("")
    comparisons = [("sockmap", "proxy+sockmap", "proxy"), ("connect4", "connect4", "proxy")]
    if "meshlet" in rows:
        comparisons += [("sockmap", "meshlet+sockmap", "meshlet"), ("connect4", "connect4", "meshlet")]
    for label, name, base in comparisons:
        s, p = rows[name], rows[base]
        by_p50, by_mean = cut(direct, p, s)
        lines.append(
            f"{label:<9} vs {base:<8}: throughput x{s.rps / p.rps:.2f}, p50 {p.p50 * 1e6:.0f} -> {s.p50 * 1e6:.0f} µs; "
            f"proxy-layer overhead cut {by_p50:.0%} by p50 ({by_p50 / SEED_CUT:.2f}x the seed's 35%), "
            f"{by_mean:.0%} by mean time per request ({by_mean / SEED_CUT:.2f}x)"
        )
    lines.append(
        f"sanity: sk_msg redirected {bench.redirected_bytes / 2**20:.0f} MiB during the sockmap runs; "
        f"connect4 rewrote {bench.kernel_connections} connections"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are reported")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections (default 16)")
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s")
    parser.add_argument("--with-meshlet", action="store_true", help="also meshlet's own sidecar, off and on")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.duration = 1, 2.0
    problem = capability.missing(capability.probe())
    for tool in ("wrk", "nginx", "haproxy"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            problem = problem or f"{tool} is not installed (scripts/setup installs it)"
    if problem:
        print(f"accel_bench: {problem}", file=sys.stderr)
        return 1

    configs = CONFIGS + (MESHLET_CONFIGS if args.with_meshlet else ())
    samples: dict[str, list[Sample]] = {name: [] for name in configs}
    name = f"meshlet-bench-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="meshlet-accel-bench-") as tmp, cgroup.temporary(name) as cg:
        root = cgroup.Cgroup(cg.path.parent)
        work, pin_root = Path(tmp), Path(f"/sys/fs/bpf/{name}")
        backends = {"v1": free_port(), "v2": free_port()}
        bench = Bench(work, cg, pin_root, backends, free_port(), free_port(), args.connections, args.duration)
        cg.add(os.getpid())  # everything started from here on (nginx, HAProxy, wrk) is in the cgroup
        try:
            nginx = shutil.which("nginx") or "/usr/sbin/nginx"
            with service("nginx", [nginx, "-c", str(nginx_conf(work, backends)), "-p", str(work)],
                         list(backends.values()), work / "nginx.log"):  # fmt: skip
                runs: dict[str, Callable[[], Sample]] = {
                    "direct": bench.direct,
                    "proxy": lambda: bench.sidecar("haproxy", accelerate=False),
                    "proxy+sockmap": lambda: bench.sidecar("haproxy", accelerate=True),
                    "connect4": bench.connect4,
                    "meshlet": lambda: bench.sidecar("meshlet", accelerate=False),
                    "meshlet+sockmap": lambda: bench.sidecar("meshlet", accelerate=True),
                }
                for round_ in range(args.rounds):
                    order = configs if round_ % 2 == 0 else tuple(reversed(configs))
                    for config in order:
                        print(f"round {round_ + 1}/{args.rounds} {config}", file=sys.stderr)
                        samples[config].append(runs[config]())
        finally:
            root.add(os.getpid())
            with contextlib.suppress(OSError):  # the hooks removed their pins; only the empty root is left
                pin_root.rmdir()
    rows = {name: median(s) for name, s in samples.items()}
    print(f"wrk -t1 -c{args.connections}, {args.rounds} rounds of {args.duration:g} s, medians")
    print(report(rows, bench))
    return 0


if __name__ == "__main__":
    sys.exit(main())
