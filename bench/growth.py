#!/usr/bin/env python3
"""Does the sidecar's memory or per-request CPU grow with the number of connections it has seen?

Two runs against one `meshlet run --workers 1` relaying to nginx (the canary policy of bench/run.py):

  idle   hold N = 0, 250, 500, 750, 1000 keep-alive client connections open (each sent one
         request, then idles); at each N read the sidecar's RSS now (VmRSS, not the peak) and
         the CPU it spends on a fixed small load (2 000 requests over 4 keep-alive connections)
  churn  10 000 requests, each on a new connection (connect, one request, close), in batches
         of 1 000; after each batch read RSS and the CPU per request

A flat line is the goal: the slopes (least squares) are what to read. A positive RSS slope in
the churn run is a leak (per-connection state never freed); in the idle run it is the price of
an open connection. Figures only, nothing asserted: the machine is shared and noisy.

  make bench-growth                        # or: .venv/bin/python bench/growth.py
  .venv/bin/python bench/growth.py --steps 0,100 --batches 2   # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.procs import Service, cpu_seconds, free_port, service
from harness.servers import meshlet_policy, start_backends
from harness.targets import MESHLET, SPLIT

REPO = Path(__file__).resolve().parents[1]
REQUEST = b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n"
CLOSE = b"GET / HTTP/1.1\r\nHost: reviews\r\nConnection: close\r\n\r\n"
TIMEOUT = 10.0  # seconds for any one request: a stuck sidecar fails the run instead of hanging it


@dataclass(frozen=True)
class Point:
    """One measurement: `x` idle connections held (idle run) or new connections made so far (churn run)."""

    x: int
    rss_kib: float
    cpu_us_per_request: float | None  # None where no load was measured (the churn run's start)


def rss_bytes(pids: Sequence[int]) -> int:
    """The resident set now (VmRSS) of every pid: the peak (VmHWM) would hide memory given back."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def slope(points: Sequence[Point], field: str) -> float:
    """Least-squares slope of `field` against x over the points that have it (0 when x does not vary)."""
    have = [p for p in points if getattr(p, field) is not None]
    if not have:
        return 0.0
    xs = [p.x for p in have]
    ys = [getattr(p, field) for p in have]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0


def raise_nofile(need: int) -> int:
    """Raise the soft descriptor limit towards the hard one; the sidecar inherits it when started after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard == resource.RLIM_INFINITY else max(soft, min(hard, need))
    if want != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return want


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> None:
    """Send one request and read its whole response (Content-Length framed, as nginx answers)."""
    writer.write(request)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    status = head.split(b" ", 2)[1]
    if status != b"200":
        raise RuntimeError(f"sidecar answered {status.decode()}: {head.splitlines()[0].decode(errors='replace')}")
    length = next((int(line.split(b":", 1)[1]) for line in head.lower().split(b"\r\n")
                   if line.startswith(b"content-length:")), 0)
    await asyncio.wait_for(reader.readexactly(length), TIMEOUT)


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), TIMEOUT)


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), TIMEOUT)


async def fixed_load(port: int, requests: int, connections: int) -> None:
    async def one(n: int) -> None:
        reader, writer = await connect(port)
        try:
            for _ in range(n):
                await exchange(reader, writer, REQUEST)
        finally:
            await close(writer)

    await asyncio.gather(*(one(requests // connections) for _ in range(connections)))


async def settle(sidecar: Service, seconds: float = 1.0) -> int:
    """RSS after a short pause, so connection setup still in flight is not half counted."""
    await asyncio.sleep(seconds)
    return rss_bytes(sidecar.pids())


async def idle_run(sidecar: Service, port: int, steps: Sequence[int], load: int, load_conns: int) -> list[Point]:
    held: list[asyncio.StreamWriter] = []
    points = []
    try:
        for n in steps:
            while len(held) < n:
                reader, writer = await connect(port)
                held.append(writer)
                await exchange(reader, writer, REQUEST)
            rss = await settle(sidecar)
            pids = sidecar.pids()
            before = cpu_seconds(pids)
            await fixed_load(port, load, load_conns)
            cpu = cpu_seconds(sidecar.pids()) - before
            points.append(Point(n, rss / 1024, 1e6 * cpu / load))
            print(f"idle  N={n:>5}  rss {rss / 2**20:7.1f} MiB  cpu {1e6 * cpu / load:6.0f} µs/request",
                  file=sys.stderr)
    finally:
        await asyncio.gather(*(close(w) for w in held))
    return points


async def new_connections(port: int, n: int) -> None:
    for _ in range(n):
        reader, writer = await connect(port)
        try:
            await exchange(reader, writer, CLOSE)
        finally:
            await close(writer)


async def churn_run(sidecar: Service, port: int, total: int, batch: int, warmup: int) -> list[Point]:
    await new_connections(port, warmup)
    rss = await settle(sidecar, 0.5)
    points = [Point(0, rss / 1024, None)]
    print(f"churn {0:>6} new connections  rss {rss / 2**20:7.1f} MiB  (after {warmup} warm-up)", file=sys.stderr)
    done = 0
    while done < total:
        before = cpu_seconds(sidecar.pids())
        await new_connections(port, batch)
        cpu = cpu_seconds(sidecar.pids()) - before
        done += batch
        rss = await settle(sidecar, 0.5)
        points.append(Point(done, rss / 1024, 1e6 * cpu / batch))
        print(f"churn {done:>6} new connections  rss {rss / 2**20:7.1f} MiB  cpu {1e6 * cpu / batch:6.0f} µs/request",
              file=sys.stderr)
    return points


def row(p: Point) -> str:
    cpu = "-" if p.cpu_us_per_request is None else f"{p.cpu_us_per_request:.0f}"
    return f"  {p.x:>6}  {p.rss_kib / 1024:>8.1f}  {cpu:>10}"


def table(idle: list[Point], churn: list[Point]) -> str:
    lines = ["idle keep-alive connections (each sent 1 request), 1 worker",
             f"  {'held':>6}  {'RSS MiB':>8}  {'CPU µs/req':>10}"]
    lines += [row(p) for p in idle]
    if len(idle) > 1:
        lines.append(f"  slope: RSS {slope(idle, 'rss_kib'):+.1f} KiB per idle connection; "
                     f"CPU {1000 * slope(idle, 'cpu_us_per_request'):+.1f} µs/request per 1 000 idle connections")
    lines += ["", "sequential new connections (connect, 1 request, close), 1 worker",
              f"  {'made':>6}  {'RSS MiB':>8}  {'CPU µs/req':>10}"]
    lines += [row(p) for p in churn]
    if len(churn) > 1:
        lines.append(f"  slope: RSS {1000 * slope(churn, 'rss_kib'):+.1f} KiB per 1 000 connections; "
                     f"CPU {1000 * slope(churn, 'cpu_us_per_request'):+.2f} µs/request per 1 000 connections")
    return "\n".join(lines)


@contextlib.contextmanager
def sidecar(work: Path, policy: Path, name: str) -> Iterator[tuple[Service, int]]:
    """A fresh `meshlet run --workers 1` per run, so the churn run does not start with the idle run's heap.

    It inherits this process's raised RLIMIT_NOFILE (see raise_nofile)."""
    ports = {"outbound": free_port(), "inbound": free_port(), "admin": free_port()}
    argv = [str(MESHLET), "run", "--policy", str(policy), "--workers", "1"]
    argv += [f"--{k}=127.0.0.1:{p}" for k, p in ports.items()]
    with service(f"meshlet-{name}", argv, list(ports.values()), work / f"meshlet-{name}.log") as svc:
        yield svc, ports["outbound"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="0,250,500,750,1000", help="idle connections to hold, in order")
    parser.add_argument("--load", type=int, default=2000, help="requests of the fixed load at each step")
    parser.add_argument("--batches", type=int, default=10, help="churn batches of --batch new connections")
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=200, help="new connections before the churn run's first "
                        "batch, not counted (first-use costs would otherwise read as a falling slope)")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    try:
        steps = [int(s) for s in args.steps.split(",")]
    except ValueError:
        parser.error(f"--steps: not a list of integers: {args.steps!r}")
    if sorted(steps) != steps or min(steps) < 0:
        parser.error("--steps: must be non-negative and increasing")
    if not shutil.which("nginx") and not Path("/usr/sbin/nginx").exists():
        print("bench: nginx is not installed; run `make bench-growth` (it installs everything)", file=sys.stderr)
        return 1
    load_conns = 4
    # Each held client connection costs the sidecar two descriptors (client and upstream) and this process one.
    nofile = raise_nofile(3 * max(steps) + 1024)
    if nofile < 2 * max(steps) + 256:
        print(f"bench: RLIMIT_NOFILE hard limit {nofile} is too low for {max(steps)} connections", file=sys.stderr)
        return 1

    with tempfile.TemporaryDirectory(prefix="meshlet-growth-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        backends = start_backends(stack, work)
        policy = meshlet_policy(work, {n: (backends[n], w) for n, w in SPLIT.items()})
        started = time.monotonic()
        try:
            with sidecar(work, policy, "idle") as (proc, port):
                idle = asyncio.run(idle_run(proc, port, steps, args.load, load_conns))
            with sidecar(work, policy, "churn") as (proc, port):
                churn = asyncio.run(churn_run(proc, port, args.batches * args.batch, args.batch, args.warmup))
        except (TimeoutError, OSError, RuntimeError, asyncio.IncompleteReadError) as e:
            logs = sorted(work.glob("meshlet-*.log"), key=lambda p: p.stat().st_mtime)
            log = logs[-1].read_text(errors="replace").strip().splitlines() if logs else []
            print(f"bench: {type(e).__name__}: {e}" + (f" (sidecar log: {log[-1]})" if log else ""), file=sys.stderr)
            return 1
        seconds = time.monotonic() - started

    print(table(idle, churn))
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / "growth.json"
    out.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "workers": 1, "fixed_load": {"requests": args.load, "connections": load_conns}, "seconds": round(seconds, 1),
        "idle": [asdict(p) for p in idle], "churn": [asdict(p) for p in churn],
        "slopes": {
            "idle_rss_kib_per_connection": slope(idle, "rss_kib"),
            "idle_cpu_us_per_request_per_1k_connections": 1000 * slope(idle, "cpu_us_per_request"),
            "churn_rss_kib_per_1k_connections": 1000 * slope(churn, "rss_kib"),
            "churn_cpu_us_per_request_per_1k_connections": 1000 * slope(churn, "cpu_us_per_request"),
        },
    }, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
