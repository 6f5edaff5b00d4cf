"""Load generators: wrk for throughput, and an open-loop client for latency at a fixed rate.

wrk is closed-loop (each connection waits for its answer), so at saturation it measures
throughput, not the latency a user sees at a given rate. The fixed-rate client schedules
request i at t0 + i/rate and measures from that scheduled instant, so a stall is charged to
every request it delays (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from dataclasses import dataclass

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


@dataclass(frozen=True)
class LoadResult:
    requests: int
    errors: int
    seconds: float
    p50: float
    p90: float
    p99: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def _seconds(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(f"unexpected wrk latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(output: str) -> LoadResult:
    percentiles = dict(re.findall(r"^\s+(50|90|99)%\s+(\S+)", output, re.M))
    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", output)
    if not done or len(percentiles) != 3:
        raise ValueError(f"cannot read wrk output:\n{output}")
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", output))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return LoadResult(
        requests=int(done.group(1)),
        errors=errors + (int(non2xx.group(1)) if non2xx else 0),
        seconds=float(done.group(2)) * _UNITS[done.group(3)],
        p50=_seconds(percentiles["50"]),
        p90=_seconds(percentiles["90"]),
        p99=_seconds(percentiles["99"]),
    )


def wrk(url: str, connections: int, duration: float, host: str | None = None) -> LoadResult:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency", url]
    if host:
        argv[1:1] = ["-H", f"Host: {host}"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30, check=True).stdout
    return parse_wrk(out)


async def _response(reader: asyncio.StreamReader) -> bytes:
    """Read one response with a content-length body; its status line."""
    status = await reader.readline()
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    await reader.readexactly(length)
    return status


def fixed_rate(port: int, rate: float, duration: float, connections: int = 16, host: str = "reviews",
               warm: bool = False) -> LoadResult:
    """`warm`: each connection sends one untimed request first, so connection set-up (a proxy's
    upstream connect and TLS handshake) is not in the figures: steady state with connection reuse."""
    return asyncio.run(_fixed_rate(port, rate, duration, connections, host, warm))


async def _fixed_rate(port: int, rate: float, duration: float, connections: int, host: str,
                      warm: bool = False) -> LoadResult:
    request = f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    total = int(rate * duration)
    start = time.monotonic() + (1.0 if warm else 0.2)
    next_index = iter(range(total))
    latencies: list[float] = []
    errors = 0

    async def worker() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            if warm:
                writer.write(request)
                await _response(reader)
            for i in next_index:
                scheduled = start + i / rate
                delay = scheduled - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                writer.write(request)
                status = await _response(reader)
                latencies.append(time.monotonic() - scheduled)
                if not status.startswith(b"HTTP/1.1 2"):
                    errors += 1
        finally:
            writer.close()

    results = await asyncio.gather(*(worker() for _ in range(connections)), return_exceptions=True)
    errors += sum(1 for r in results if isinstance(r, Exception))
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")

    return LoadResult(len(latencies), errors + total - len(latencies), time.monotonic() - start,
                      pct(0.5), pct(0.9), pct(0.99))
