"""`meshlet run --policy FILE | --watch-kube`: the sidecar (outbound, inbound and admin listeners)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from meshlet.commands import CommandError, print_warnings, refused
from meshlet.policy import PolicyInvalid, load_text
from meshlet.policy.model import Address
from meshlet.proxy.engine import DEFAULT_ENGINE, ENGINES
from meshlet.telemetry.proxy import METRICS_COMPAT

if TYPE_CHECKING:
    from meshlet.k8s.kube import Cluster


def _listen(text: str) -> Address:
    from meshlet.proxy.config import parse_listen

    try:
        return parse_listen(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _app_metrics(text: str) -> str:
    from meshlet.proxy.appmetrics import parse_app_metrics

    try:
        return str(parse_app_metrics(text))
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
    parser.add_argument("--policy", metavar="FILE", help="policy YAML to start with (or --watch-kube)")
    parser.add_argument("--watch-kube", action="store_true",
                        help="start with an empty pass-through table, then follow the TrafficPolicies of the "
                             "namespace (list+watch; kubeconfig, else in-cluster service account)")
    parser.add_argument("-n", "--namespace", help="with --watch-kube: the namespace to watch "
                        "(default: the kubeconfig context's, or the Pod's)")
    parser.add_argument("--context", help="with --watch-kube: the kubeconfig context to use")
    parser.add_argument("--outbound", type=_listen, default="127.0.0.1:15001", metavar="HOST:PORT")
    parser.add_argument("--inbound", type=_listen, default=":15006", metavar="HOST:PORT")
    parser.add_argument("--admin", type=_listen, default="127.0.0.1:15000", metavar="HOST:PORT",
                        help="the control API (GET/PUT /policy, rollouts, /certs, health, metrics); loopback only")
    parser.add_argument("--health", type=_listen, metavar="HOST:PORT",
                        help="a read-only port for probes and Prometheus: /healthz /readyz /metrics only "
                             "(injected sidecars: [::]:15020 on the Pod IP); default: none")
    parser.add_argument("--workload-labels", type=Path, metavar="FILE",
                        help="this workload's labels, one key=\"value\" per line (the Downward API's "
                             "metadata.labels file): picks the policy whose mtls.selector matches them")
    parser.add_argument("--app", type=_listen, default="127.0.0.1:8080", metavar="HOST:PORT",
                        help="where inbound requests go (the local application)")
    parser.add_argument("--engine", choices=ENGINES,
                        help="lean (default: uvloop + httptools, meshlet's own HTTP/1.1 data plane) or mitmproxy "
                             "(the programmable engine: mitmproxy addons, flow files)")
    parser.add_argument("--addon", action="append", default=[], metavar="FILE",
                        help="a mitmproxy addon script (mitmproxy's addon API, as `mitmproxy -s FILE` loads it) "
                             "run on every flow; repeatable; selects --engine mitmproxy")
    parser.add_argument("--strict-hosts", action="store_true",
                        help="answer 404 for hosts no policy governs instead of passing them through")
    parser.add_argument("--drain-timeout", type=float, default=10.0, metavar="SECONDS",
                        help="on SIGTERM, how long to let requests in flight finish (default 10)")
    parser.add_argument("--header-timeout", type=_seconds, default=10.0, metavar="SECONDS",
                        help="lean engine: a client must send a request head within this, else 408 (default 10)")
    parser.add_argument("--idle-timeout", type=_seconds, default=60.0, metavar="SECONDS",
                        help="lean engine: idle keep-alive client connections are closed after this (default 60)")
    parser.add_argument("--metrics-compat", choices=METRICS_COMPAT, default="none",
                        help="also export Istio's standard metrics (istio_requests_total, ...)")
    parser.add_argument("--workload", default="unknown", metavar="NAME",
                        help="this workload's name, in Istio-style labels and the metadata sent to mesh peers")
    parser.add_argument("--workload-namespace", default="unknown", metavar="NS",
                        help="this workload's namespace, in Istio-style labels and the metadata sent to mesh peers")
    parser.add_argument("--app-metrics", type=_app_metrics, metavar="URL",
                        help="the app's own Prometheus metrics on loopback, e.g. http://127.0.0.1:9080/metrics: "
                             "served with the sidecar's on the --health port's /metrics (injection sets it from "
                             "the Pod's prometheus.io annotations)")
    parser.add_argument("--access-log", default="off", metavar="stdout|FILE|off",
                        help="one JSON line per request (Istio's field names) to stdout or appended to FILE "
                             "(default off)")
    parser.add_argument("--workers", type=_workers, default=os.cpu_count() or 1, metavar="N",
                        help="proxy processes sharing the listeners (default: CPU count)")
    parser.add_argument("--identity", type=Path, metavar="DIR",
                        help="mesh identity dir, followed for rotations: cert.pem, key.pem, ca.pem (`meshlet cert "
                             "issue`), or tls.crt, tls.key, ca.crt (cert-manager csi-driver-spiffe), or svid.pem, "
                             "svid_key.pem, svid_bundle.pem (SPIRE spiffe-helper): enables mTLS")
    parser.add_argument("--ca", type=Path, metavar="DIR",
                        help="local mode: the mesh CA dir (`meshlet ca init`); the sidecar reissues its --identity "
                             "certificate from it once half its lifetime has passed")
    parser.add_argument("--identity-server", metavar="URL",
                        help="instead of --identity: fetch the workload certificate from `meshlet identity serve` "
                             "(https://...), key kept in memory, renewed at half its lifetime")
    parser.add_argument("--identity-token", type=Path, metavar="FILE",
                        help="with --identity-server: the ServiceAccount token (audience meshlet) to present, "
                             "read again for every request")
    parser.add_argument("--trust-bundle", type=Path, metavar="FILE",
                        help="with --identity-server: PEM file of the mesh CAs to trust, followed for CA rotations")
    parser.add_argument("--state-dir", type=Path, metavar="DIR",
                        help="keep rollout state in DIR/rollouts.json so a restart resumes at the recorded step "
                             "(default: in memory only)")
    parser.add_argument("--prometheus", metavar="URL",
                        help="read rollout analyses from this Prometheus (sum over every replica) instead of "
                             "this sidecar's own metrics")
    parser.add_argument("--lease-duration", type=_lease_seconds, metavar="SECONDS",
                        help="with --watch-kube: rollouts are driven by the holder of the Lease meshlet-rollouts "
                             "in the namespace, and recorded in each TrafficPolicy's status; a replica takes "
                             "over this long after the holder stops renewing (default 15)")
    parser.set_defaults(handler=run, optimize=lambda args: args.workers == 1)  # >1: workers re-exec themselves


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive number of seconds")
    return value


def _lease_seconds(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 3:
        raise argparse.ArgumentTypeError(f"{text!r}: expected whole seconds, at least 3")
    return value


def _workload_labels(path: Path | None) -> tuple[tuple[str, str], ...]:
    if path is None:
        return ()
    from meshlet.k8s.labels import read_labels

    try:
        return read_labels(path)
    except (OSError, ValueError) as e:
        raise CommandError(f"--workload-labels {e}") from None


def _access_log(spec: str) -> str:
    """`stdout`, `off`, or a file this process can append to (checked now: one line, not a traceback
    from a worker), as an absolute path (workers may not share our working directory)."""
    if spec in ("off", "stdout"):
        return spec
    from meshlet.telemetry.accesslog import AccessLog

    path = os.path.abspath(os.path.expanduser(spec))
    try:
        log = AccessLog.open(path)
    except OSError as e:
        raise CommandError(str(e)) from None
    if log is not None:
        log.close()
    return path


def _engine(args: argparse.Namespace) -> str:
    """Addon scripts run on mitmproxy's engine: --addon selects it, and contradicts --engine lean."""
    if not args.addon:
        return args.engine or DEFAULT_ENGINE
    if args.engine == "lean":
        raise CommandError("--addon runs mitmproxy addon scripts: it needs --engine mitmproxy, not lean")
    return "mitmproxy"


def _addons(paths: list[str]) -> tuple[str, ...]:
    """Absolute paths (workers may not share our idea of the working directory), each once."""
    found: list[str] = []
    for path in paths:
        full = os.path.abspath(os.path.expanduser(path))
        if not os.path.isfile(full):
            raise CommandError(f"--addon {path}: no such file")
        if full in found:
            raise CommandError(f"--addon {path}: given twice")
        found.append(full)
    return tuple(found)


def _cluster(args: argparse.Namespace) -> Cluster | None:
    """The cluster to watch with --watch-kube (None with --policy); flag mistakes are one line."""
    if (args.policy is None) == (not args.watch_kube):
        raise CommandError("give exactly one of --policy FILE or --watch-kube")
    if not args.watch_kube:
        if args.namespace or args.context:
            raise CommandError("--namespace and --context only apply with --watch-kube")
        if args.lease_duration:
            raise CommandError("--lease-duration only applies with --watch-kube")
        return None
    from meshlet.k8s.kube import KubeError, connect

    try:
        return connect(args.context)
    except KubeError as e:
        raise CommandError(str(e)) from None


def run(args: argparse.Namespace) -> int:
    from meshlet.mtls.errors import IdentityError
    from meshlet.mtls.requirements import require_identity
    from meshlet.proxy.config import SidecarConfig
    from meshlet.proxy.serve import StartupError, run_serve, setup_logging
    from meshlet.proxy.state import compile_policy
    from meshlet.rollout.service import RolloutOptions

    engine, addons = _engine(args), _addons(args.addon)
    if args.app_metrics and args.health is None:
        raise CommandError("--app-metrics is served on the --health port's /metrics: give --health HOST:PORT too")
    cluster = _cluster(args)
    labels = _workload_labels(args.workload_labels)
    try:
        config = SidecarConfig(
            outbound=args.outbound, inbound=args.inbound, admin=args.admin, app=args.app, health=args.health,
            strict_hosts=args.strict_hosts, drain_timeout=args.drain_timeout,
            metrics_compat=args.metrics_compat, workload=args.workload, identity_dir=args.identity, ca_dir=args.ca,
            identity_server=args.identity_server, identity_token=args.identity_token, trust_bundle=args.trust_bundle,
            engine=engine, addons=addons, header_timeout=args.header_timeout, idle_timeout=args.idle_timeout,
            workload_labels=labels, workload_namespace=args.workload_namespace,
            access_log=_access_log(args.access_log), app_metrics=args.app_metrics,
        )
    except ValueError as e:
        raise CommandError(str(e)) from None
    try:
        if cluster is not None:  # ready at once: see meshlet.k8s.follow for why not wait for policies
            applied = compile_policy("", 1)
        else:
            with open(args.policy, encoding="utf-8") as f:
                text = f.read()
            if not text.strip():
                load_text(text, args.policy)  # an empty policy file is an error, located by the loader
            applied = compile_policy(text, 1, args.policy)
        require_identity(applied.policies, config.has_identity, dict(labels))
    except OSError as e:
        raise CommandError(f"{args.policy}: {e.strerror}") from None
    except PolicyInvalid as e:
        raise refused(e) from None
    print_warnings(applied.warnings)
    identity_flags = (config.identity_dir, config.ca_dir, config.identity_server, config.identity_token,
                      config.trust_bundle)
    if any(flag is not None for flag in identity_flags):
        from meshlet.mtls.source import check_identity_config  # cryptography: loaded only with an identity

        try:
            check_identity_config(config)  # once here, before any worker starts
        except (IdentityError, ValueError) as e:
            raise CommandError(str(e)) from None
    if args.state_dir is not None:
        try:
            args.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CommandError(f"--state-dir {args.state_dir}: {e.strerror}") from None
        if not os.access(args.state_dir, os.W_OK):
            raise CommandError(f"--state-dir {args.state_dir}: not writable")
    if args.prometheus is not None and not args.prometheus.startswith(("http://", "https://")):
        raise CommandError(f"--prometheus {args.prometheus}: expected an http:// or https:// URL")
    kube = None
    if cluster is not None:  # every replica following the namespace elects one rollout driver
        from meshlet.rollout.kube import coordinate

        kube = coordinate(cluster, args.namespace, args.lease_duration or 15)
    rollout = RolloutOptions(args.state_dir, args.prometheus, kube)
    setup_logging()

    def ready(addrs: dict[str, str]) -> None:
        logging.getLogger("meshlet.proxy").info("ready %s", " ".join(f"{k}={v}" for k, v in addrs.items()))
        if cluster is not None:
            from meshlet.k8s.follow import follow

            follow(cluster, addrs["admin"], args.namespace)

    try:
        if args.workers == 1:
            return run_serve(config, applied, ready, rollout)
        from meshlet.proxy.supervisor import supervise  # a worker-serving CLI never loads it

        return asyncio.run(supervise(config, applied, args.workers, ready, rollout))
    except (StartupError, IdentityError) as e:
        raise CommandError(str(e)) from None
