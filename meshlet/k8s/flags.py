"""The sidecar flags `meshlet inject` and `meshlet webhook` share, so both inject the same Pod.

The Helm chart passes its `proxy:` values to the webhook as exactly these flags.
"""

from __future__ import annotations

import argparse

from meshlet.k8s.sidecar import IDENTITY_MODES, PULL_POLICIES, InjectConfig, Resources, check_quantity
from meshlet.telemetry.proxy import METRICS_COMPAT

_DEFAULT = InjectConfig()


def _quantity(text: str) -> str:
    try:
        return check_quantity(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _optional_quantity(text: str) -> str | None:
    """A limit; `none` (or an empty string) leaves the limit unset."""
    return None if text.lower() in ("", "none") else _quantity(text)


def _https(text: str) -> str:
    if not text.startswith("https://"):
        raise argparse.ArgumentTypeError(f"bad identity server {text!r}: expected https://HOST:PORT")
    return text


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"bad port {text!r}: expected a number from 1 to 65535")
    return int(text)


def _count(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 256:
        raise argparse.ArgumentTypeError(f"bad count {text!r}: expected a number from 1 to 256")
    return int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sidecar", "what is injected (defaults match the Helm chart's values.yaml)")
    r = _DEFAULT.resources
    group.add_argument("--image", default=_DEFAULT.image, help="sidecar image (default: %(default)s)")
    group.add_argument("--image-pull-policy", default=_DEFAULT.image_pull_policy, choices=PULL_POLICIES)
    group.add_argument("--cpu-request", type=_quantity, default=r.cpu_request, help="default: %(default)s")
    group.add_argument("--memory-request", type=_quantity, default=r.memory_request, help="default: %(default)s")
    group.add_argument("--cpu-limit", type=_optional_quantity, default=r.cpu_limit, help="'none' for no limit")
    group.add_argument("--memory-limit", type=_optional_quantity, default=r.memory_limit, help="'none' for no limit")
    group.add_argument("--proxy-uid", type=int, default=_DEFAULT.uid, help="UID the sidecar runs as; its traffic "
                       "is not redirected (default: %(default)s)")
    group.add_argument("--proxy-workers", type=_count, default=_DEFAULT.workers, metavar="N",
                       help="sidecar proxy processes (default: %(default)s)")
    group.add_argument("--outbound-port", type=_port, default=_DEFAULT.outbound_port)
    group.add_argument("--inbound-port", type=_port, default=_DEFAULT.inbound_port)
    group.add_argument("--admin-port", type=_port, default=_DEFAULT.admin_port, help="the control API, on loopback")
    group.add_argument("--health-port", type=_port, default=_DEFAULT.health_port,
                       help="/healthz /readyz /metrics on the Pod IP, for probes and Prometheus")
    group.add_argument("--identity-mode", choices=IDENTITY_MODES, default=_DEFAULT.identity,
                       help="where sidecars get their workload certificate: server (`meshlet identity serve`, "
                       "keys in memory), csi (cert-manager csi-driver-spiffe), none (no mTLS) (default: %(default)s)")
    group.add_argument("--identity-server", type=_https, default=_DEFAULT.identity_server, metavar="URL",
                       help="the identity service, with --identity-mode server (default: %(default)s)")
    group.add_argument("--trust-bundle-configmap", default=_DEFAULT.trust_bundle, metavar="NAME",
                       help="ConfigMap (key ca.pem) with the mesh CAs, in each injected namespace "
                       "(default: %(default)s)")
    group.add_argument("--metrics-compat", choices=METRICS_COMPAT, default=_DEFAULT.metrics_compat,
                       help="the sidecars' `meshlet run --metrics-compat`: istio also exports Istio's standard "
                       "series, for Flagger, Kiali and Istio's dashboards (default: %(default)s)")
    group.add_argument("--merge-metrics", action=argparse.BooleanOptionalAction, default=_DEFAULT.merge_metrics,
                       help="serve a Pod's own prometheus.io target merged with the sidecar's metrics on the "
                       "health port, as Istio does; a Pod opts out with the annotation "
                       "meshlet.dev/merge-metrics: \"false\" (default: on)")


def config_from_args(args: argparse.Namespace) -> InjectConfig:
    return InjectConfig(
        image=args.image,
        image_pull_policy=args.image_pull_policy,
        resources=Resources(args.cpu_request, args.memory_request, args.cpu_limit, args.memory_limit),
        uid=args.proxy_uid,
        outbound_port=args.outbound_port,
        inbound_port=args.inbound_port,
        admin_port=args.admin_port,
        health_port=args.health_port,
        workers=args.proxy_workers,
        identity=args.identity_mode,
        identity_server=args.identity_server,
        trust_bundle=args.trust_bundle_configmap,
        metrics_compat=args.metrics_compat,
        merge_metrics=args.merge_metrics,
    )
