"""What a mesh mTLS hop costs over a plaintext hop, through two real sidecars (figures, not assertions).

    client ──► sidecar A :outbound ──(plain | mTLS)──► sidecar B :inbound (PERMISSIVE) ──► nginx

One pair of sidecars carries both: on A, host `plain` routes to B over plaintext and host `mesh`
over mTLS (`tls: mesh`, identity checked), and B's PERMISSIVE inbound takes both on one port, so
the only difference between the two paths is the TLS. Clients keep their connections (and A its
upstream connection per client connection), so this measures steady-state mTLS: each connection's
first request (which makes A connect and handshake with B) is sent before the clock starts. With
`--cold` it is timed too: then the run's `--connections` handshakes, all at its start, queue the
requests behind them and make most of the p99. Rounds alternate plain/mesh so drift on a noisy
machine hits both; the median round is reported. A last, serial pass opens a new connection per
request to show the handshake (resumed: A offers B the TLS session of its previous connection).

    .venv/bin/python bench/mtls_bench.py [--rate 200] [--seconds 10] [--rounds 5] [--connections 8] [--cold]

The seed's production table showed mTLS costing +15% p50 and +17% p99 over plain proxying.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from harness import load
from harness.procs import free_port, service
from harness.servers import nginx_conf
from prometheus_client.parser import text_string_to_metric_families

from meshlet.mtls.ca import issue_workload, new_authority
from meshlet.mtls.files import write_identity

FRONTEND = "spiffe://cluster.local/ns/bench/sa/frontend"
REVIEWS = "spiffe://cluster.local/ns/bench/sa/reviews"
MESHLET = str(Path(sys.executable).with_name("meshlet"))


def policy(name: str, host: str, backend: str, extra: str = "", mtls: str = "") -> str:
    return (
        f"apiVersion: meshlet.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: {name}}}\nspec:\n"
        f"  host: {host}\n  backends:\n    b: {{address: \"{backend}\"{extra}}}\n"
        f"  routes:\n    - name: all\n      to: [{{backend: b, weight: 100}}]\n{mtls}"
    )


def sidecar_argv(work: Path, name: str, policy_text: str, identity: Path, ports: dict[str, int], app: int) -> list[str]:
    policy_file = work / f"{name}.yaml"
    policy_file.write_text(policy_text)
    return [
        MESHLET, "run", "--policy", str(policy_file), "--identity", str(identity),
        "--outbound", f"127.0.0.1:{ports['outbound']}", "--inbound", f"127.0.0.1:{ports['inbound']}",
        "--admin", f"127.0.0.1:{ports['admin']}", "--app", f"127.0.0.1:{app}",
    ]


def check(port: int, host: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/", headers={"Host": host})
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    if response.status != 200:
        raise SystemExit(f"mtls_bench: host {host} through the sidecars answers {response.status}: {body[:200]!r}")


def per_connection(port: int, host: str, count: int) -> tuple[float, float]:
    """p50, p99 of `count` serial requests, each on a new connection (so a new upstream handshake)."""
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        check(port, host)
        latencies.append(time.perf_counter() - started)
    latencies.sort()
    return latencies[len(latencies) // 2], latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]


def outbound_handshakes(admin_port: int) -> tuple[float, float]:
    """(ok, resumed) outbound mTLS handshakes from a sidecar's metrics, summed over its workers."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    totals = {"meshlet_mtls_handshakes": 0.0, "meshlet_mtls_resumed": 0.0}
    for family in text_string_to_metric_families(text):
        if family.name in totals:
            totals[family.name] += sum(
                s.value for s in family.samples if s.name.endswith("_total")
                and s.labels.get("direction") == "outbound" and s.labels.get("result", "ok") == "ok"
            )
    return totals["meshlet_mtls_handshakes"], totals["meshlet_mtls_resumed"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second per run (default 200)")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each run (default 10)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating plain/mesh rounds (default 5)")
    parser.add_argument("--connections", type=int, default=8, help="keep-alive client connections (default 8)")
    parser.add_argument("--handshakes", type=int, default=200, help="new-connection requests per path (default 200)")
    parser.add_argument("--cold", action="store_true",
                        help="time each connection's first request too (the upstream connect and handshake)")
    args = parser.parse_args()
    if not shutil.which("nginx") and not Path("/usr/sbin/nginx").exists():
        print("mtls_bench: nginx is missing (scripts/setup installs nginx-light)", file=sys.stderr)
        return 1

    with tempfile.TemporaryDirectory(prefix="meshlet-mtls-bench-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        now = dt.datetime.now(dt.UTC)
        ca = new_authority(now)
        write_identity(work / "a", issue_workload(ca, FRONTEND, now), ca.cert)
        write_identity(work / "b", issue_workload(ca, REVIEWS, now), ca.cert)

        app = free_port()
        a = {"outbound": free_port(), "inbound": free_port(), "admin": free_port()}
        b = {"outbound": free_port(), "inbound": free_port(), "admin": free_port()}
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        stack.enter_context(service("nginx", [nginx, "-c", str(nginx_conf(work, {"app": app})), "-p", str(work)],
                                    [app], work / "nginx.log"))
        target = f"127.0.0.1:{b['inbound']}"
        b_policy = policy("self", "self", "127.0.0.1:9", mtls="  mtls: {mode: PERMISSIVE}\n")
        a_policy = policy("plain", "plain", target) + "---\n" + policy(
            "mesh", "mesh", target, extra=f', tls: mesh, identity: "{REVIEWS}"')
        stack.enter_context(service("sidecar-b", sidecar_argv(work, "b", b_policy, work / "b", b, app),
                                    list(b.values()), work / "b.log"))
        stack.enter_context(service("sidecar-a", sidecar_argv(work, "a", a_policy, work / "a", a, app),
                                    list(a.values()), work / "a.log"))
        for host in ("plain", "mesh"):
            check(a["outbound"], host)

        results: dict[str, list[load.LoadResult]] = {"direct": [], "plain": [], "mesh": []}
        for _ in range(args.rounds):
            results["direct"].append(load.fixed_rate(app, args.rate, args.seconds, args.connections, "app",
                                                     warm=not args.cold))
            for host in ("plain", "mesh"):
                results[host].append(load.fixed_rate(a["outbound"], args.rate, args.seconds, args.connections, host,
                                                     warm=not args.cold))
        cold = {host: per_connection(a["outbound"], host, args.handshakes) for host in ("plain", "mesh")}
        handshakes = outbound_handshakes(a["admin"])

    p50 = {k: statistics.median(r.p50 for r in v) for k, v in results.items()}
    p99 = {k: statistics.median(r.p99 for r in v) for k, v in results.items()}
    errors = {k: sum(r.errors for r in v) for k, v in results.items()}
    print(f"mTLS hop vs plaintext hop through two meshlet sidecars: {args.rate:g} req/s, {args.seconds:g}s x "
          f"{args.rounds} alternating rounds, {args.connections} keep-alive connections "
          f"({'first requests timed: handshakes included' if args.cold else 'warmed: steady state'}); median round")
    print(f"{'path':<34}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    names = {"direct": "client → nginx (no sidecar)", "plain": "A → B plaintext hop", "mesh": "A → B mTLS hop"}
    for key, label in names.items():
        print(f"{label:<34}{p50[key] * 1e3:>9.2f}{p99[key] * 1e3:>9.2f}{errors[key]:>8}")
    added = {k: (p50[k] - p50["direct"], p99[k] - p99["direct"]) for k in ("plain", "mesh")}
    print("added by the sidecars: " + "; ".join(
        f"{label} p50 +{added[k][0] * 1e3:.2f} ms p99 +{added[k][1] * 1e3:.2f} ms"
        for k, label in (("plain", "plaintext"), ("mesh", "mTLS"))))
    print(f"mTLS / plaintext: p50 x{p50['mesh'] / p50['plain']:.3f} ({(p50['mesh'] / p50['plain'] - 1) * 100:+.1f}%), "
          f"p99 x{p99['mesh'] / p99['plain']:.3f} ({(p99['mesh'] / p99['plain'] - 1) * 100:+.1f}%)  "
          "[seed production: +15% p50, +17% p99]")
    print(f"new connection per request ({args.handshakes} serial, so one upstream handshake each): " + "; ".join(
        f"{host} p50 {cold[host][0] * 1e3:.2f} ms p99 {cold[host][1] * 1e3:.2f} ms" for host in ("plain", "mesh")))
    print(f"A's upstream mTLS handshakes over the whole run: {handshakes[0]:.0f}, of which resumed {handshakes[1]:.0f} "
          "(one per client connection: upstream connections are reused)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
