"""`meshlet identity serve`: sign workload certificates for ServiceAccount tokens (TokenReview)."""

from __future__ import annotations

import argparse
from pathlib import Path

from meshlet.commands import CommandError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "identity",
        help="the workload certificate service (identity serve)",
        description="The cluster's workload certificate signer.",
    )
    actions = parser.add_subparsers(dest="identity_command", metavar="ACTION", required=True)
    serve = actions.add_parser(
        "serve",
        help="sign CSRs from sidecars that present a ServiceAccount token (audience meshlet)",
        description="Serve POST /v1/sign over HTTPS. Each caller's projected ServiceAccount token is checked by a "
        "TokenReview against the Kubernetes API (kubeconfig, else in-cluster); the certificate names "
        "spiffe://TRUST_DOMAIN/ns/NS/sa/SA from the review, never what the CSR asks. The service's own "
        "certificate comes from the same CA and names the --listen host and every --san.",
        epilog="example: meshlet identity serve --ca /etc/meshlet/ca --listen 0.0.0.0:15012 "
        "--san meshlet-identity.meshlet-system.svc --ttl 24h",
    )
    serve.add_argument("--ca", required=True, type=Path, metavar="DIR",
                       help="CA dir (`meshlet ca init`; followed for `meshlet ca rotate`)")
    serve.add_argument("--listen", required=True, metavar="HOST:PORT", help="e.g. 0.0.0.0:15012")
    serve.add_argument("--san", action="append", default=[], metavar="NAME",
                       help="another name for the serving certificate (repeatable): the Service's DNS names")
    serve.add_argument("--ttl", default="24h", metavar="DURATION",
                       help="workload certificate lifetime (default 24h; seconds for tests, e.g. 20s)")
    serve.add_argument("--trust-domain", default="cluster.local", metavar="DOMAIN",
                       help="the SPIFFE trust domain (default: %(default)s)")
    serve.add_argument("--rate-limit", default="120/m", metavar="COUNT/PERIOD",
                       help="certificates per identity (all replicas of a ServiceAccount share it), "
                            "as a token bucket of COUNT refilled over PERIOD (default: %(default)s)")
    serve.add_argument("--metrics", metavar="HOST:PORT",
                       help="serve Prometheus /metrics in plain HTTP here (default: off)")
    serve.add_argument("--context", help="the kubeconfig context for TokenReviews (default: the current one)")
    serve.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from prometheus_client import CollectorRegistry, start_http_server

    from meshlet.identity.ratelimit import RateLimiter, parse_rate
    from meshlet.identity.server import ServingTls, make_server, serving_names
    from meshlet.identity.service import CaFollower, IdentityService
    from meshlet.k8s.kube import KubeError
    from meshlet.k8s.server import serve_until_signalled
    from meshlet.k8s.tokenreview import token_reviewer
    from meshlet.mtls.files import IdentityError
    from meshlet.mtls.wire import AUDIENCE
    from meshlet.policy.values import parse_duration, parse_spiffe_id
    from meshlet.proxy.config import parse_listen
    from meshlet.telemetry.identity import IdentityMetrics

    try:
        listen = parse_listen(args.listen)
        metrics_at = parse_listen(args.metrics) if args.metrics else None
        ttl = parse_duration(args.ttl)
        count, per = parse_rate(args.rate_limit)
        parse_spiffe_id(f"spiffe://{args.trust_domain}/ns/x/sa/x")
        names = serving_names(listen.host, args.san)
    except ValueError as e:
        raise CommandError(str(e)) from None
    try:
        cas = CaFollower(args.ca)
        tls = ServingTls(names, ttl, cas)
        reviewer = token_reviewer(AUDIENCE, args.context)
    except (IdentityError, KubeError, ValueError) as e:
        raise CommandError(str(e)) from None
    registry = CollectorRegistry()
    service = IdentityService(cas, reviewer, IdentityMetrics(registry), ttl=ttl, trust_domain=args.trust_domain,
                              limiter=RateLimiter(count, per))
    try:
        server = make_server((listen.host, listen.port), service, tls)
        if metrics_at is not None:
            start_http_server(metrics_at.port, metrics_at.host, registry)
    except OSError as e:
        raise CommandError(f"cannot listen: {e.strerror or e}") from None
    serve_until_signalled(server, "identity", f" for spiffe://{args.trust_domain} "
                                              f"(ttl {args.ttl}, names {', '.join(names)})")
    return 0
