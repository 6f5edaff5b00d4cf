"""`meshlet stats`: a live p50/p90/p99 table per port (and workload) from the agent's /metrics, like `top`."""

from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.request

from meshlet.commands import CommandError
from meshlet.telemetry.node import PercentileRow, percentile_rows


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "stats",
        help="live TCP latency percentiles per port, read from a running agent",
        description="Print p50/p90/p99 of connect latency and smoothed RTT per port, refreshing.",
        epilog="example: meshlet stats --agent http://127.0.0.1:15090 --interval 2",
    )
    parser.add_argument("--agent", default="http://127.0.0.1:15090", metavar="URL", help="agent metrics base URL")
    parser.add_argument("--interval", type=float, default=1.0, metavar="SECONDS", help="refresh period")
    parser.add_argument("--once", action="store_true", help="print one table and exit")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    url = args.agent.rstrip("/") + "/metrics"
    while True:
        table = render(percentile_rows(_fetch(url)))
        if args.once:
            print(table)
            return 0
        sys.stdout.write("\x1b[H\x1b[2J" + f"meshlet stats: {url}  {time.strftime('%H:%M:%S')}\n\n{table}\n")
        sys.stdout.flush()
        time.sleep(args.interval)


def render(rows: list[PercentileRow]) -> str:
    """One row per series; PORT `*` is a workload's traffic on ports no policy names."""
    lines = [f"{'PORT':>6} {'DIR':<4} {'METRIC':<8} {'COUNT':>9} {'P50':>10} {'P90':>10} {'P99':>10}  WORKLOAD"]
    for r in rows:
        quantiles = " ".join(f"{_duration(q):>10}" for q in (r.p50, r.p90, r.p99))
        port = r.port or "*"
        lines.append(f"{port:>6} {r.direction:<4} {r.metric:<8} {r.count:>9} {quantiles}  {r.workload}".rstrip())
    if not rows:
        lines.append("(no observations yet: are the policy ports seeing traffic?)")
    return "\n".join(lines)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e6:.0f}us" if seconds < 1e-3 else f"{seconds * 1e3:.1f}ms"


def _fetch(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read().decode()
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise CommandError(f"stats: cannot read {url}: {reason} (is `meshlet agent` running?)") from None
