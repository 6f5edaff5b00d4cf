"""Issue 13's targets against one run's figures: the checklist printed after the table.

The issue's terms: the lean engine with 1 worker against HAProxy `nbthread 1`, the 90/10 split,
`wrk -t1`. The figures are whatever this run measured: on a loaded machine they are smoke
figures, and a met or missed there says little (the README's table comes from a quiet run).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from harness.report import Row

OWN_CODE_TEST = "tests/unit/proxy/test_lean_speed.py"
Outcome = tuple[str, bool | None]  # the figure, met


@dataclass(frozen=True)
class Check:
    goal: str
    figure: str  # what this run measured, or why it did not
    met: bool | None  # None: not measured

    def line(self) -> str:
        mark = {True: "[met]   ", False: "[MISSED]", None: "[  -  ] "}[self.met]
        return f"  {mark} {self.goal}: {self.figure}"


@dataclass(frozen=True)
class Subjects:
    """The rows the checks read: the 1-worker lean sidecar, its HAProxy, the two-hop pair."""

    lean: str = "meshlet-lean-1w"
    haproxy: str = "haproxy-1t"
    plain: str = "meshlet-lean-2hop"
    mtls: str = "meshlet-lean-mtls"


def _ms(seconds: float, sign: str = "") -> str:
    return f"{seconds * 1000:{sign}.3f} ms"


def checklist(
    rows: Sequence[Row], subjects: Subjects, idle_rss_mib: dict[str, float], own_code: float | str
) -> list[Check]:
    """`own_code`: seconds per request from the micro-benchmark, or why it did not run."""
    by_key = {(r.target, r.scenario): r for r in rows}
    s = subjects

    def throughput() -> Outcome:
        mesh, hap = by_key[s.lean, "wrk-c16"].rps, by_key[s.haproxy, "wrk-c16"].rps
        ratio = mesh / hap if hap else 0.0
        return f"{mesh:.0f} req/s = {ratio:.0%} of {hap:.0f}", ratio >= 0.60

    def added_c1() -> Outcome:
        floor = by_key["direct", "wrk-c1"].p50
        mesh, hap = by_key[s.lean, "wrk-c1"].p50 - floor, by_key[s.haproxy, "wrk-c1"].p50 - floor
        if hap <= 0:
            return f"{_ms(mesh, '+')}; HAProxy added {_ms(hap, '+')} here: no ratio", None
        return f"{_ms(mesh, '+')} = {mesh / hap:.1f}x {_ms(hap, '+')}", mesh <= 3 * hap

    def added_rate() -> Outcome:
        added = by_key[s.lean, "rate-500"].p50 - by_key["direct", "rate-500"].p50
        return _ms(added, "+"), added <= 0.0002

    def idle_rss() -> Outcome:
        idle = idle_rss_mib[s.lean]
        peak = max((r.largest_rss_mb or 0 for r in rows if r.target == s.lean), default=0)
        under_load = f"; peak (VmHWM) by the end of the load {peak:.1f} MiB" if peak else ""
        return f"{idle:.1f} MiB idle ({s.lean}){under_load}", idle <= 35

    def mtls_hop() -> Outcome:
        mtls, plain = by_key[s.mtls, "wrk-c1"].p50, by_key[s.plain, "wrk-c1"].p50
        return f"{_ms(mtls)} vs {_ms(plain)} = {mtls / plain:.2f}x ({s.mtls} / {s.plain})", mtls <= 1.15 * plain

    def own() -> Outcome:
        if isinstance(own_code, str):
            return f"not measured ({own_code})", None
        return f"{own_code * 1e6:.1f} µs median ({OWN_CODE_TEST})", own_code <= 10e-6

    have = {*by_key, *((t, "idle") for t in idle_rss_mib)}
    specs = [
        (f"throughput at 16 connections >= 60% of {s.haproxy}", [(s.lean, "wrk-c16"), (s.haproxy, "wrk-c16")],
         throughput),
        (f"added p50 at 1 connection <= 3x {s.haproxy}'s", [(s.lean, "wrk-c1"), (s.haproxy, "wrk-c1"),
                                                             ("direct", "wrk-c1")], added_c1),
        ("added p50 at 500 req/s open loop <= 0.2 ms", [(s.lean, "rate-500"), ("direct", "rate-500")], added_rate),
        ("idle RSS per worker <= 35 MiB", [(s.lean, "idle")], idle_rss),
        ("an mTLS hop <= 1.15x a plaintext hop at p50 (1 connection)", [(s.mtls, "wrk-c1"), (s.plain, "wrk-c1")],
         mtls_hop),
        ("meshlet's own code <= 10 µs per request", [], own),
    ]
    checks = []
    for goal, needs, measured in specs:
        absent = [f"{target} {what}" for target, what in needs if (target, what) not in have]
        why = f"not measured (no {', '.join(absent)} in this run)"
        checks.append(Check(goal, *measured()) if not absent else Check(goal, why, None))
    return checks


def render(checks: Sequence[Check], subjects: Subjects) -> str:
    head = (f"issue 13 targets ({subjects.lean} against {subjects.haproxy}, this run; "
            "on a loaded machine, met or missed says little):")
    return "\n".join(["", head, *(c.line() for c in checks)])
