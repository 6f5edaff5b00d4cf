"""`meshlet run --policy FILE`: the sidecar (outbound, inbound and admin listeners)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from meshlet.commands import CommandError
from meshlet.policy import PolicyInvalid
from meshlet.policy.model import Address
from meshlet.telemetry.proxy import METRICS_COMPAT


def _listen(text: str) -> Address:
    from meshlet.proxy.config import parse_listen

    try:
        return parse_listen(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _workers(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 64:
        raise argparse.ArgumentTypeError(f"bad worker count {text!r}: expected 1 to 64")
    return int(text)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run the sidecar proxy (outbound :15001, inbound :15006, admin :15000)",
        description="Run the meshlet sidecar: route outbound requests by policy, forward inbound ones to the app.",
        epilog="example: meshlet run --policy policies/canary.yaml --app 127.0.0.1:8080",
    )
    parser.add_argument("--policy", required=True, metavar="FILE", help="policy YAML to start with")
    parser.add_argument("--outbound", type=_listen, default="127.0.0.1:15001", metavar="HOST:PORT")
    parser.add_argument("--inbound", type=_listen, default=":15006", metavar="HOST:PORT")
    parser.add_argument("--admin", type=_listen, default="127.0.0.1:15000", metavar="HOST:PORT")
    parser.add_argument("--app", type=_listen, default="127.0.0.1:8080", metavar="HOST:PORT",
                        help="where inbound requests go (the local application)")
    parser.add_argument("--strict-hosts", action="store_true",
                        help="answer 404 for hosts no policy governs instead of passing them through")
    parser.add_argument("--drain-timeout", type=float, default=10.0, metavar="SECONDS",
                        help="on SIGTERM, how long to let requests in flight finish (default 10)")
    parser.add_argument("--metrics-compat", choices=METRICS_COMPAT, default="none",
                        help="also export Istio's standard metrics (istio_requests_total, ...)")
    parser.add_argument("--workload", default="unknown", help="this workload's name, for Istio-style labels")
    parser.add_argument("--workers", type=_workers, default=os.cpu_count() or 1, metavar="N",
                        help="proxy processes sharing the listeners (default: CPU count)")
    parser.add_argument("--identity", type=Path, metavar="DIR",
                        help="mesh identity dir (cert.pem, key.pem, ca.pem from `meshlet cert issue`): enables mTLS")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from meshlet.mtls.files import IdentityError, read_identity
    from meshlet.proxy.config import SidecarConfig
    from meshlet.proxy.master import StartupError, serve, setup_logging
    from meshlet.proxy.state import compile_policy
    from meshlet.proxy.supervisor import supervise

    try:
        with open(args.policy, encoding="utf-8") as f:
            applied = compile_policy(f.read(), 1, args.policy)
    except OSError as e:
        raise CommandError(f"{args.policy}: {e.strerror}") from None
    except PolicyInvalid as e:
        for error in e.errors[:-1]:
            print(error, file=sys.stderr)
        raise CommandError(str(e.errors[-1])) from None
    if args.identity is not None:
        try:
            read_identity(args.identity)  # checked once here, before any worker starts
        except IdentityError as e:
            raise CommandError(str(e)) from None
    config = SidecarConfig(
        outbound=args.outbound, inbound=args.inbound, admin=args.admin, app=args.app,
        strict_hosts=args.strict_hosts, drain_timeout=args.drain_timeout,
        metrics_compat=args.metrics_compat, workload=args.workload, identity_dir=args.identity,
    )
    setup_logging()

    def ready(addrs: dict[str, str]) -> None:
        logging.getLogger("meshlet.proxy").info("ready %s", " ".join(f"{k}={v}" for k, v in addrs.items()))

    try:
        if args.workers == 1:
            return asyncio.run(serve(config, applied, ready))
        return asyncio.run(supervise(config, applied, args.workers, ready))
    except (StartupError, IdentityError) as e:
        raise CommandError(str(e)) from None
