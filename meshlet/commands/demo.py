"""`meshlet demo` (what `make run` runs): two demo backends and a sidecar with a 90/10 canary."""

from __future__ import annotations

import argparse
import logging
import sys

from meshlet.commands import CommandError

DEMO_POLICY = """\
# meshlet demo: 90% of requests for `reviews` go to v1, 10% to the canary v2.
apiVersion: meshlet.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  backends:
    v1: {address: "127.0.0.1:9081"}
    v2: {address: "127.0.0.1:9082"}
  routes:
    - name: canary
      to: [{backend: v1, weight: 90}, {backend: v2, weight: 10}]
      timeout: 2s
      retries: {attempts: 2, retryOn: [connect-failure, 5xx]}
"""
BACKENDS = (("v1", 9081), ("v2", 9082))


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run two demo backends (v1, v2) behind a sidecar with a 90/10 canary",
        description="Start demo backends v1 (:9081) and v2 (:9082) and a sidecar routing `reviews` 90/10.",
        epilog="stop with Ctrl-C",
    )
    parser.set_defaults(handler=run)


def _instructions(addrs: dict[str, str]) -> str:
    outbound, admin = addrs["outbound"], addrs["admin"]
    return f"""
meshlet demo is running (Ctrl-C stops it).
  backends    v1 http://127.0.0.1:9081   v2 http://127.0.0.1:9082
  send        curl -s -H 'Host: reviews' http://{outbound}/
  as a proxy  curl -s -x http://{outbound} http://reviews/
  100 times   for i in $(seq 100); do curl -s -H 'Host: reviews' http://{outbound}/; done | sort | uniq -c
  metrics     curl -s http://{admin}/metrics | grep -E '^(meshlet|istio)_requests_total'
  access log  one JSON line per request below (start_time, response_code, response_flags, ...)
  policy      curl -s http://{admin}/policy
  change it   .venv/bin/meshlet apply policies/ab-test.yaml --sidecar http://{admin}
              curl -s -H 'Host: reviews' -H 'x-group: beta' http://{outbound}/
"""


async def _demo() -> int:
    from meshlet.proxy.config import SidecarConfig
    from meshlet.proxy.demo_backend import start_backend
    from meshlet.proxy.serve import serve
    from meshlet.proxy.state import compile_policy
    from meshlet.rollout.service import RolloutOptions

    servers = []
    try:
        for name, port in BACKENDS:
            try:
                servers.append(await start_backend(name, "127.0.0.1", port))
            except OSError as e:
                raise CommandError(f"demo backend {name} cannot listen on 127.0.0.1:{port}: {e.strerror}") from None
        applied = compile_policy(DEMO_POLICY, 1, "demo-policy")
        # The demo shows what telemetry looks like: Istio's series too, and the access log on stdout.
        config = SidecarConfig(workload="demo", workload_namespace="default", metrics_compat="istio",
                               access_log="stdout")
        return await serve(config, applied, lambda addrs: print(_instructions(addrs), flush=True), RolloutOptions())
    finally:
        for server in servers:
            server.close()


def run(args: argparse.Namespace) -> int:
    from meshlet.proxy.serve import StartupError, setup_logging

    setup_logging()
    logging.getLogger("meshlet.proxy").info("starting demo")
    try:
        import uvloop

        return uvloop.run(_demo())  # the default (lean) engine's loop
    except StartupError as e:
        raise CommandError(f"{e} (is another sidecar or `make run` already running?)") from None
    finally:
        sys.stdout.flush()
