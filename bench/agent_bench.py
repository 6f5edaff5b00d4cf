"""The node agent's own cost: loopback HTTP throughput with and without the observation programs
attached, the agent's CPU and memory, and the programs' own run time. Prints figures; asserts nothing.

    sudo .venv/bin/python bench/agent_bench.py [--rounds 4] [--duration 5]

Rounds alternate baseline and agent so drift on a noisy machine hits both sides alike; the
median of each side is reported. Two load shapes: keep-alive (one tcp_probe per segment, the
steady cost) and a new connection per request (adds the connect-latency program's work). The
watched port is nginx's, so every packet of the load goes through the programs' full path.
The programs run in the senders' and softirq context, not in the agent process, so their cost
is read from the kernel (kernel.bpf_stats_enabled, run_time_ns per program) while the agent runs.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from harness.load import LoadResult, parse_wrk
from harness.procs import cpu_seconds, free_port, peak_rss_bytes, service
from harness.servers import nginx_conf

MESHLET = Path(sys.executable).parent / "meshlet"
BPF_STATS = Path("/proc/sys/kernel/bpf_stats_enabled")
SHAPES = ("keep-alive", "new-connection")


@dataclass(frozen=True)
class Sample:
    shape: str
    agent: bool
    rps: float
    agent_cpu: float = 0.0  # share of one core used by the agent process during the load
    agent_rss: int = 0  # bytes, peak
    bpf_cpu: float = 0.0  # share of one core spent inside the programs
    bpf_ns_per_run: float = 0.0


def load(port: int, shape: str, duration: float, connections: int) -> LoadResult:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency", f"http://127.0.0.1:{port}/"]
    if shape == "new-connection":
        argv[1:1] = ["-H", "Connection: close"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30, check=True).stdout
    return parse_wrk(out)


def bpf_run_stats(pids: list[int]) -> tuple[int, int]:
    """(run_time_ns, run_cnt) summed over the BPF programs these processes hold open."""
    time_ns = count = 0
    for pid in pids:
        for info in Path(f"/proc/{pid}/fdinfo").glob("*"):
            try:
                fields = dict(line.split(":", 1) for line in info.read_text().splitlines() if ":" in line)
            except OSError:
                continue
            if "prog_type" in fields:
                time_ns += int(fields.get("run_time_ns", "0"))
                count += int(fields.get("run_cnt", "0"))
    return time_ns, count


def wait_ready(log: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    """After the programs are compiled and attached, so CPU is the steady cost, not bcc's compile."""
    deadline = time.monotonic() + timeout
    while "agent: ready" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"agent not ready: {log.read_text()}")
        time.sleep(0.1)


def measure(workdir: Path, port: int, shape: str, with_agent: bool, args: argparse.Namespace) -> Sample:
    if not with_agent:
        return Sample(shape, False, load(port, shape, args.duration, args.connections).rps)
    metrics = free_port()
    pins = Path(f"/sys/fs/bpf/meshlet-bench-{metrics}")
    argv = [str(MESHLET), "agent", "--ports", str(port), "--metrics", f"127.0.0.1:{metrics}"]
    argv += ["--pin-dir", str(pins / "agent")]
    with service("agent", argv, [metrics], workdir / "agent.log") as agent:
        wait_ready(workdir / "agent.log", agent.proc)
        pids = agent.pids()
        cpu_before, bpf_before, start = cpu_seconds(pids), bpf_run_stats(pids), time.monotonic()
        result = load(port, shape, args.duration, args.connections)
        wall = time.monotonic() - start
        cpu = (cpu_seconds(pids) - cpu_before) / wall
        bpf_ns, runs = (after - before for after, before in zip(bpf_run_stats(pids), bpf_before, strict=True))
        rss = peak_rss_bytes(pids)
    subprocess.run(["rmdir", str(pins)], capture_output=True, check=False)
    return Sample(shape, True, result.rps, cpu, rss, bpf_ns / 1e9 / wall, bpf_ns / runs if runs else 0.0)


def run_rounds(args: argparse.Namespace) -> list[Sample]:
    samples: list[Sample] = []
    with tempfile.TemporaryDirectory(prefix="meshlet-agent-bench-") as tmp:
        workdir = Path(tmp)
        port = free_port()
        conf = nginx_conf(workdir, {"backend": port})
        with service("nginx", ["nginx", "-c", str(conf), "-p", str(workdir)], [port], workdir / "nginx.log"):
            for i in range(args.rounds):
                for shape in SHAPES:
                    for with_agent in (False, True) if i % 2 == 0 else (True, False):
                        samples.append(measure(workdir, port, shape, with_agent, args))
                        rps = samples[-1].rps
                        print(f"round {i + 1} {shape:<14} agent={with_agent!s:<5} {rps:>9.0f} req/s", file=sys.stderr)
    return samples


def report(args: argparse.Namespace, samples: list[Sample]) -> None:
    print(
        f"\nnode agent overhead, {args.rounds} alternating rounds x {args.duration:g}s, "
        f"wrk -c{args.connections} against nginx on loopback (median per side)\n"
    )
    columns = ("load shape", "baseline req/s", "with agent", "cost", "agent CPU", "agent RSS", "BPF CPU", "ns/run")
    widths = (16, 16, 12, 8, 11, 11, 9, 8)
    print("".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(columns, widths, strict=True))))
    for shape in SHAPES:
        base = statistics.median(s.rps for s in samples if s.shape == shape and not s.agent)
        agent = [s for s in samples if s.shape == shape and s.agent]
        rps = statistics.median(s.rps for s in agent)
        cells = (
            f"{base:.0f}",
            f"{rps:.0f}",
            f"{(base - rps) / base:.1%}",
            f"{statistics.median(s.agent_cpu for s in agent):.1%}",
            f"{max(s.agent_rss for s in agent) / 2**20:.0f}MB",
            f"{statistics.median(s.bpf_cpu for s in agent):.2%}",
            f"{statistics.median(s.bpf_ns_per_run for s in agent):.0f}",
        )
        print(f"{shape:<16}" + "".join(f"{c:>{w}}" for c, w in zip(cells, widths[1:], strict=True)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of load per run")
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    stats_before = BPF_STATS.read_text()
    BPF_STATS.write_text("1")  # the kernel then times every program run (restored afterwards)
    try:
        samples = run_rounds(args)
    finally:
        BPF_STATS.write_text(stats_before)
    report(args, samples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
