#!/usr/bin/env python3
"""HTTP/2 (h2c) side by side: direct, HAProxy (`proto h2`) and meshlet's lean engine, one run.

The load is gRPC-like: h2load sends small POSTs with `content-type: application/grpc` over a few
connections with many concurrent streams each, the shape of gRPC unary calls on long-lived
channels. Every target relays to the same nginx h2c backends (v1, v2) with a 90/10 split; one
HAProxy thread against one meshlet worker, as bench/run.py compares HTTP/1.1. Rounds alternate
the order of the targets and the table shows medians.

examples:
  .venv/bin/python bench/h2_bench.py                 # 3 rounds of 5 s
  .venv/bin/python bench/h2_bench.py --quick         # 1 round of 2 s
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from harness.procs import cpu_seconds, free_port, service
from harness.servers import meshlet_policy

REPO = Path(__file__).resolve().parents[1]
MESHLET = REPO / ".venv" / "bin" / "meshlet"
SPLIT = {"v1": 90, "v2": 10}


@dataclass
class Figures:
    rps: float
    mean_ms: float
    cpu_us: float  # the target's CPU per request (0 for direct)
    failed: int


def nginx_h2c(stack: contextlib.ExitStack, work: Path) -> dict[str, int]:
    ports = {"v1": free_port(), "v2": free_port()}
    servers = "\n".join(
        f"  server {{ listen 127.0.0.1:{port} http2; keepalive_requests 10000000; "
        f"location / {{ return 200 '{name}\\n'; }} }}" for name, port in ports.items()
    )
    conf = work / "nginx.conf"
    conf.write_text(f"daemon off;\nmaster_process off;\nworker_processes 1;\npid {work}/nginx.pid;\n"
                    f"error_log {work}/nginx-error.log warn;\nevents {{ worker_connections 4096; }}\n"
                    f"http {{\n  access_log off;\n  client_body_temp_path {work}/body;\n{servers}\n}}\n")
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    stack.enter_context(service("nginx", [nginx, "-c", str(conf), "-p", str(work)], list(ports.values()),
                                work / "nginx.log"))
    return ports


def haproxy_h2(stack: contextlib.ExitStack, work: Path, backends: dict[str, int]) -> tuple[int, list[int]]:
    port = free_port()
    servers = "\n".join(f"    server {name} 127.0.0.1:{backends[name]} weight {weight} proto h2"
                        for name, weight in SPLIT.items())
    conf = work / "haproxy.cfg"
    conf.write_text(f"global\n    nbthread 1\ndefaults\n    mode http\n    timeout connect 2s\n"
                    f"    timeout client 30s\n    timeout server 30s\nfrontend fe\n    bind 127.0.0.1:{port} proto h2\n"
                    f"    default_backend be\nbackend be\n    balance roundrobin\n    http-reuse always\n{servers}\n")
    svc = stack.enter_context(service("haproxy", ["haproxy", "-f", str(conf)], [port], work / "haproxy.log"))
    return port, svc.pids()


def meshlet_lean(stack: contextlib.ExitStack, work: Path, backends: dict[str, int]) -> tuple[int, list[int]]:
    port = free_port()
    policy = meshlet_policy(work, {name: (backends[name], weight) for name, weight in SPLIT.items()})
    argv = [str(MESHLET), "run", "--policy", str(policy), "--workers", "1", "--outbound", f"127.0.0.1:{port}",
            "--inbound", f"127.0.0.1:{free_port()}", "--admin", f"127.0.0.1:{free_port()}"]
    svc = stack.enter_context(service("meshlet", argv, [port], work / "meshlet.log", ready="ready outbound="))
    return port, svc.pids()


def h2load(
    port: int, host: str, seconds: float, connections: int, streams: int, body: Path,
) -> tuple[float, float, int]:
    done = subprocess.run(
        ["h2load", "-D", str(round(seconds)), "-c", str(connections), "-m", str(streams), "-d", str(body),
         "-H", f":authority: {host}", "-H", "content-type: application/grpc", "-H", "te: trailers",
         f"http://127.0.0.1:{port}/demo.Svc/Echo"],
        capture_output=True, text=True, timeout=seconds + 60,
    )
    out = done.stdout + done.stderr
    finished = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    if finished is None:
        raise RuntimeError(f"h2load against port {port} gave no result:\n{out[-2000:]}")
    rps = float(finished[1])
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+(\S+)", out)[1]
    failed = int(re.search(r"(\d+) failed", out)[1])
    return rps, _ms(mean), failed


def _ms(text: str) -> float:
    value = float(re.match(r"[\d.]+", text)[0])
    return value / 1000 if text.endswith("us") else value * 1000 if text.endswith("s") and not text.endswith("ms") \
        else value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--streams", type=int, default=16, help="concurrent streams per connection")
    args = parser.parse_args(argv)
    if shutil.which("h2load") is None:
        print("h2_bench: h2load not found: apt-get install nghttp2-client (scripts/setup installs it)", file=sys.stderr)
        return 1
    rounds, seconds = (1, 2.0) if args.quick else (3, 5.0)
    with tempfile.TemporaryDirectory(prefix="meshlet-h2bench-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        body = work / "call.bin"
        body.write_bytes(b"\x00\x00\x00\x00\x05hello")  # one gRPC message frame
        backends = nginx_h2c(stack, work)
        targets = {"direct": (backends["v1"], [])}
        targets["haproxy-1t"] = haproxy_h2(stack, work, backends)
        targets["meshlet-lean-1w"] = meshlet_lean(stack, work, backends)
        results: dict[str, list[Figures]] = {name: [] for name in targets}
        for r in range(rounds):
            order = list(targets) if r % 2 == 0 else list(reversed(targets))
            for name in order:
                port, pids = targets[name]
                before = cpu_seconds(pids) if pids else 0.0
                rps, mean, failed = h2load(port, "reviews", seconds, args.connections, args.streams, body)
                used = (cpu_seconds(pids) - before) if pids else 0.0
                results[name].append(Figures(rps, mean, used / max(rps * seconds, 1) * 1e6, failed))
                print(f"round {r + 1}/{rounds} {name:16} {rps:9.0f} req/s", file=sys.stderr)
    print(f"h2c, {args.connections} connections x {args.streams} streams, gRPC-like unary POSTs, "
          f"median of {rounds} round(s) of {seconds:g} s")
    print(f"{'target':18}{'req/s':>10}{'mean ms':>10}{'x HAProxy':>11}{'cpu us/req':>12}{'failed':>8}")
    reference = statistics.median(f.rps for f in results["haproxy-1t"])
    for name, figures in results.items():
        rps = statistics.median(f.rps for f in figures)
        mean = statistics.median(f.mean_ms for f in figures)
        cpu = statistics.median(f.cpu_us for f in figures)
        print(f"{name:18}{rps:10.0f}{mean:10.2f}{rps / reference:11.3f}{cpu if name != 'direct' else 0:12.1f}"
              f"{sum(f.failed for f in figures):8d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
