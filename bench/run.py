#!/usr/bin/env python3
"""meshlet's benchmark: direct vs HAProxy vs meshlet's two engines, measured alternately in one run.

Every target relays to the same nginx backends (v1, v2) with the same 90/10 split; each round
measures every target once per scenario (the order reversed every other round), so machine
drift hits all of them alike, and the table shows the median of the rounds. Like is compared
with like: `x HAProxy` is against the HAProxy with as many threads as the target has workers.

  direct              wrk -> nginx v1 (the floor)
  haproxy-1t, -2t     wrk -> HAProxy 90/10 with `nbthread 1`, `nbthread 2` (the reference proxy)
  meshlet-lean-1w     wrk -> `meshlet run --engine lean --workers 1` (and -2w: `--workers 2`)
  meshlet-mitm-1w     wrk -> `meshlet run --engine mitmproxy --workers 1` (and -2w)
  meshlet-ENGINE-2hop wrk -> sidecar A outbound -> plaintext -> sidecar B inbound -> nginx (1 worker each)
  meshlet-ENGINE-mtls the same two sidecars with `tls: mesh` and identities from `meshlet ca`/`meshlet cert`
  meshlet-ENGINE-accel a 1-worker sidecar with `meshlet agent --accelerate` on a cgroup holding wrk and it
  kernel-split        no proxy: `meshlet agent` splits connects to the policy's `spec.vip` (dataplane: kernel)

ENGINE is `--engine` (default lean). The last two need root and BPF; a target that cannot start
is listed as `unavailable: reason`. CPU and peak RSS are the target's whole process tree under
load (both sidecars for the two-hop targets; the agent is not charged: it does no per-request
work in user space). Idle RSS is read per worker before the load, after a few requests. After
the table come issue 13's targets as a checklist, with meshlet's own code per request from the
lean engine's micro-benchmark (tests/unit/proxy/test_lean_speed.py).

examples:
  make bench                                   # all targets, 3 rounds of 5 s per scenario
  .venv/bin/python bench/run.py --quick        # 1 round of 1 s: a smoke run
  .venv/bin/python bench/run.py --targets direct,haproxy-1t,meshlet-lean-1w
  .venv/bin/python bench/run.py --engine mitmproxy --targets direct,meshlet-2hop,meshlet-mtls
  .venv/bin/python bench/run.py --profile meshlet-lean-1w   # also a py-spy flame graph into results/
  .venv/bin/python bench/run.py --baseline HEAD~1 --targets direct,meshlet-lean-1w  # before/after
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import shutil
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import asdict
from pathlib import Path

from harness import goals, load, own_code, report
from harness.procs import cpu_seconds, peak_rss_bytes, peak_rss_each
from harness.servers import start_backends
from harness.targets import SHORT, SPLIT, TARGETS, Run, Target, baseline_starter

REPO = Path(__file__).resolve().parents[1]


class TargetDied(RuntimeError):
    """A process of the target ended during the run: no figure of it is kept from then on."""


def measure(target: Target, scenario: str, duration: float) -> report.Row:
    pids = target.pids()
    cpu_before = cpu_seconds(pids)
    with target.workload.inside() if target.workload else contextlib.nullcontext():
        result = generate(target, scenario, duration)
    cpu = cpu_seconds(pids) - cpu_before
    dead = [why for svc in target.services if (why := svc.died())]
    if dead:
        raise TargetDied("; ".join(dead))
    return report.Row(
        target.name, scenario, result.rps, result.p50, result.p90, result.p99, result.errors,
        cpu_per_1k=(1000 * cpu / result.requests) if pids and result.requests else None,
        peak_rss_mb=peak_rss_bytes(pids) / 2**20 if pids else None,
        largest_rss_mb=max(peak_rss_each(target.worker_pids() or pids), default=0) / 2**20 if pids else None,
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


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, of: {', '.join(TARGETS)}")
    parser.add_argument("--engine", choices=tuple(SHORT), default="lean",
                        help="engine of the 2hop, mtls and accel targets (default lean)")
    parser.add_argument("--scenarios", default="wrk-c1,wrk-c16,rate-500", help="wrk-c1, wrk-c16, rate-500")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median is reported")
    parser.add_argument("--quick", action="store_true", help="1 round of 1 s, a short micro-benchmark: a smoke run")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--baseline", metavar="REV", help="also measure meshlet as committed at git REV "
                        "(1 worker, --engine if REV has engines), e.g. HEAD: before/after a change in one run")
    parser.add_argument("--profile", metavar="TARGET", help="after the rounds, a py-spy flame graph of TARGET "
                        "under wrk -c16 into RESULTS/flame-TARGET.svg (e.g. meshlet-lean-1w)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.duration = 1, 1.0
    args.names = [t for t in args.targets.split(",") if t]
    if args.baseline:
        TARGETS["baseline"] = baseline_starter(args.baseline)
        args.names.append("baseline")
    unknown = [t for t in args.names if t not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s): {', '.join(unknown)}")
    args.scenarios = args.scenarios.split(",")
    bad = [sc for sc in args.scenarios if sc not in ("wrk-c1", "wrk-c16", "rate-500")]
    if bad:
        parser.error(f"unknown scenario(s): {', '.join(bad)}")
    return args


def start_targets(run: Run, names: list[str], unavailable: dict[str, str]) -> dict[str, Target]:
    """Every target that starts, by key; the others into `unavailable` with the reason."""
    targets: dict[str, Target] = {}
    for name in names:
        try:
            targets[name] = TARGETS[name](run)
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            unavailable[name] = _first_line(e)
            print(f"{name}: unavailable: {unavailable[name]}", file=sys.stderr)
    return targets


def idle_rss(targets: dict[str, Target], unavailable: dict[str, str]) -> dict[str, float]:
    """MiB per target of its largest worker at rest, read before any load (the load raises it for good).
    A target that does not answer its warm-up requests is not measured."""
    found = {}
    for key, target in list(targets.items()):
        try:
            rss = target.idle_rss_mib()
        except (OSError, RuntimeError, http.client.HTTPException) as e:
            unavailable[target.name] = f"not serving: {e}"
            del targets[key]
            continue
        if rss is not None:
            found[target.name] = round(rss, 1)
    return found


def rounds(targets: dict[str, Target], args: argparse.Namespace, unavailable: dict[str, str]) -> list[report.Row]:
    samples: dict[tuple[str, str], list[report.Row]] = {}
    dead: set[str] = set()
    for round_ in range(args.rounds):
        for scenario in args.scenarios:
            for target in list(targets.values())[:: 1 if round_ % 2 == 0 else -1]:
                if target.name in dead:
                    continue
                print(f"round {round_ + 1}/{args.rounds} {scenario:<9} {target.name}", file=sys.stderr)
                try:
                    row = measure(target, scenario, args.duration)
                except TargetDied as e:
                    unavailable[target.name] = f"died during {scenario} of round {round_ + 1}: {e}"
                    dead.add(target.name)
                    continue
                except (subprocess.SubprocessError, ValueError, OSError) as e:
                    unavailable[target.name] = f"{scenario} failed: {str(e).splitlines()[0]}"
                    continue
                samples.setdefault((target.name, scenario), []).append(row)
    rows = [report.median_rows(s) for s in samples.values()]
    order = [t.name for t in targets.values()]
    rows.sort(key=lambda r: (args.scenarios.index(r.scenario), order.index(r.target)))
    return rows


def profile_all(targets: dict[str, Target], args: argparse.Namespace) -> None:
    profiled = [t for key, t in targets.items() if args.profile in (key, t.name)]
    if args.profile and not profiled:
        print(f"bench: --profile {args.profile}: no such target was started", file=sys.stderr)
    for target in profiled:
        print(f"profiling {target.name} (py-spy, wrk -c16)", file=sys.stderr)
        try:
            print(f"flame graph: {profile(target, args.results, args.duration)}", file=sys.stderr)
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            print(f"bench: {e}", file=sys.stderr)


def own_code_figure(quick: bool) -> float | str:
    """Seconds per request of the lean engine's own code, or why it was not measured."""
    print("micro-benchmark: the lean engine's own code per request", file=sys.stderr)
    try:
        return own_code.seconds_per_request(0.2 if quick else 2.0)
    except (RuntimeError, OSError, subprocess.SubprocessError, ValueError, KeyError) as e:
        return str(e).splitlines()[0] if str(e) else type(e).__name__


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    for tool in ("wrk", "nginx", "haproxy"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            print(f"bench: {tool} is not installed; run `make bench` (it installs everything)", file=sys.stderr)
            return 1
    unavailable: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="meshlet-bench-") as tmp, contextlib.ExitStack() as stack:
        run = Run(stack, Path(tmp), start_backends(stack, Path(tmp)), args.engine)
        targets = start_targets(run, args.names, unavailable)
        idle = idle_rss(targets, unavailable)
        rows = rounds(targets, args, unavailable)
        evidence = {t.name: _evidence(t) for t in targets.values() if t.evidence}
        profile_all(targets, args)
    own = own_code_figure(args.quick)  # after the load's processes are gone: a quiet figure

    reference = {t.name: f"haproxy-{t.threads}t" for t in targets.values()}
    print(report.table(rows, unavailable, reference))
    for name, what in evidence.items():
        print(f"{name}: {what}")
    if idle:
        print(textwrap.fill("idle RSS of the largest worker, after start and a few requests: "
                            + ", ".join(f"{name} {mib:.1f} MiB" for name, mib in idle.items()), 120,
                            break_on_hyphens=False))
    short = SHORT[args.engine]
    subjects = goals.Subjects(plain=f"meshlet-{short}-2hop", mtls=f"meshlet-{short}-mtls")
    checks = goals.checklist(rows, subjects, idle, own)
    print(goals.render(checks, subjects))
    report.write(args.results, rows, unavailable,
                 {"rounds": args.rounds, "duration_s": args.duration, "split": SPLIT, "scenarios": args.scenarios,
                  "engine": args.engine, "evidence": evidence},
                 {"idle_rss_mib": idle, "own_code_us": round(own * 1e6, 2) if isinstance(own, float) else None,
                  "targets": [asdict(c) for c in checks]})
    print(f"\nwrote {args.results / 'latest.json'} and {args.results / 'latest.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
