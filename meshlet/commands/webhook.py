"""`meshlet webhook --tls-cert C --tls-key K`: the sidecar-injecting admission webhook."""

from __future__ import annotations

import argparse
import ssl
import sys

from meshlet.commands import CommandError
from meshlet.k8s import flags


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "webhook",
        help="serve the mutating admission webhook that injects the sidecar",
        description="Serve admission.k8s.io/v1 AdmissionReviews on https://HOST:PORT/mutate; answers with a "
        "JSONPatch doing what `meshlet inject` does. GET /healthz for probes.",
        epilog="example: meshlet webhook --tls-cert /tls/tls.crt --tls-key /tls/tls.key --port 8443",
    )
    parser.add_argument("--tls-cert", required=True, metavar="FILE", help="PEM certificate (chain) to serve")
    parser.add_argument("--tls-key", required=True, metavar="FILE", help="PEM private key")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8443, help="default: %(default)s")
    parser.add_argument("--fail-open", action=argparse.BooleanOptionalAction, default=True,
                        help="admit a Pod that cannot be injected, with a warning (default); "
                        "--no-fail-open refuses it")
    flags.add_arguments(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from meshlet.k8s.server import ReloadingContext, make_server, serve_until_signalled

    cfg = flags.config_from_args(args)
    try:
        context = ReloadingContext(args.tls_cert, args.tls_key, log=lambda line: print(line, file=sys.stderr))
    except (OSError, ssl.SSLError) as e:
        raise CommandError(f"cannot load TLS certificate {args.tls_cert} / key {args.tls_key}: "
                           f"{getattr(e, 'strerror', None) or e}") from None
    try:
        server = make_server((args.host, args.port), context, cfg, fail_open=args.fail_open)
    except OSError as e:
        raise CommandError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    serve_until_signalled(server, "webhook", f"/mutate (image {cfg.image}, "
                                             f"fail-{'open' if args.fail_open else 'closed'})")
    return 0
