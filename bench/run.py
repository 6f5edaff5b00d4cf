#!/usr/bin/env python3
"""meshlet's benchmark: direct vs HAProxy vs meshlet, measured alternately in one run.

Every target relays to the same nginx backends (v1, v2) with the same 90/10 split; each round
measures every target once per scenario, so machine drift hits all of them alike, and the
table shows the median of the rounds.

examples:
  make bench                                   # all targets, 3 rounds of 5 s per scenario
  .venv/bin/python bench/run.py --quick        # 1 round of 2 s: a smoke run
  .venv/bin/python bench/run.py --targets direct,haproxy,meshlet-1w
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from harness import load, report
from harness.procs import Service, cpu_seconds, free_port, peak_rss_bytes, service
from harness.servers import haproxy_conf, meshlet_policy, nginx_conf

REPO = Path(__file__).resolve().parents[1]
MESHLET = REPO / ".venv" / "bin" / "meshlet"
SPLIT = {"v1": 90, "v2": 10}


@dataclass
class Target:
    name: str
    port: int
    host: str | None  # Host header to send (the sidecar routes by it)
    services: list[Service]

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


def meshlet_starter(workers: int | None) -> Starter:
    def start(stack: contextlib.ExitStack, work: Path, backends: dict[str, int]) -> Target:
        name = f"meshlet-{workers}w" if workers else f"meshlet-{os.cpu_count()}w"
        (work / name).mkdir()
        policy = meshlet_policy(work / name, {n: (backends[n], w) for n, w in SPLIT.items()})
        outbound, inbound, admin = free_port(), free_port(), free_port()
        argv = [str(MESHLET), "run", "--policy", str(policy), "--outbound", f"127.0.0.1:{outbound}",
                "--inbound", f"127.0.0.1:{inbound}", "--admin", f"127.0.0.1:{admin}"]
        if workers:
            argv += ["--workers", str(workers)]
        svc = stack.enter_context(service(name, argv, [outbound, admin], work / f"{name}.log"))
        return Target(name, outbound, "reviews", [svc])

    return start


TARGETS: dict[str, Starter] = {
    "direct": start_direct,
    "haproxy": start_haproxy,
    "meshlet-1w": meshlet_starter(1),
    "meshlet-workers": meshlet_starter(None),
}


def measure(target: Target, scenario: str, duration: float) -> report.Row:
    pids = target.pids()
    cpu_before = cpu_seconds(pids)
    url = f"http://127.0.0.1:{target.port}/"
    if scenario == "wrk-c1":
        result = load.wrk(url, 1, duration, target.host)
    elif scenario == "wrk-c16":
        result = load.wrk(url, 16, duration, target.host)
    else:
        result = load.fixed_rate(target.port, 500, duration, host=target.host or "localhost")
    cpu = cpu_seconds(pids) - cpu_before
    return report.Row(
        target.name, scenario, result.rps, result.p50, result.p90, result.p99, result.errors,
        cpu_per_1k=(1000 * cpu / result.requests) if pids and result.requests else None,
        peak_rss_mb=peak_rss_bytes(pids) / 2**20 if pids else None,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, of: {', '.join(TARGETS)}")
    parser.add_argument("--scenarios", default="wrk-c1,wrk-c16,rate-500", help="wrk-c1, wrk-c16, rate-500")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median is reported")
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.duration = 1, 2.0
    for tool in ("wrk", "nginx", "haproxy"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            print(f"bench: {tool} is not installed; run `make bench` (it installs everything)", file=sys.stderr)
            return 1
    names = [t for t in args.targets.split(",") if t]
    unknown = [t for t in names if t not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s): {', '.join(unknown)}")
    scenarios = args.scenarios.split(",")

    samples: dict[tuple[str, str], list[report.Row]] = {}
    unavailable: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="meshlet-bench-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        backends = {"v1": free_port(), "v2": free_port()}
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        stack.enter_context(service("nginx", [nginx, "-c", str(nginx_conf(work, backends)), "-p", str(work)],
                                    list(backends.values()), work / "nginx.log"))
        targets: list[Target] = []
        for name in names:
            try:
                targets.append(TARGETS[name](stack, work, backends))
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                unavailable[name] = str(e).splitlines()[0]
        for round_ in range(args.rounds):
            for scenario in scenarios:
                for target in targets:
                    print(f"round {round_ + 1}/{args.rounds} {scenario:<9} {target.name}", file=sys.stderr)
                    try:
                        row = measure(target, scenario, args.duration)
                    except (subprocess.SubprocessError, ValueError, OSError) as e:
                        unavailable[target.name] = f"{scenario} failed: {str(e).splitlines()[0]}"
                        continue
                    samples.setdefault((target.name, scenario), []).append(row)

    rows = [report.median_rows(s) for s in samples.values()]
    rows.sort(key=lambda r: (scenarios.index(r.scenario), names.index(r.target)))
    print(report.table(rows, unavailable))
    report.write(args.results, rows, unavailable,
                 {"rounds": args.rounds, "duration_s": args.duration, "split": SPLIT, "scenarios": scenarios})
    print(f"\nwrote {args.results / 'latest.json'} and {args.results / 'latest.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
