"""`meshlet agent`: the privileged per-node process (eBPF observation, QoS, the AIMD loop)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from meshlet.commands import CommandError, print_warnings
from meshlet.ebpf.agent import AgentConfig
from meshlet.policy import PolicyInvalid, load_files

if TYPE_CHECKING:  # the kubernetes client loads only with --kube
    from meshlet.k8s.nodewatch import ClusterPlans

EPILOG = """examples:
  meshlet agent --ports 8080,9081                 observe TCP on two ports, metrics on :15090
  meshlet agent --policy policies/qos.yaml --interface veth0 --interval 1s
  meshlet agent --accelerate --cgroup /sys/fs/cgroup/unified/pod1     sockmap app<->sidecar sockets
  meshlet agent --policy reviews.yaml --cgroup pod1 --kernel-vip reviews=127.0.0.1:9080
                                                   split `dataplane: kernel` connects in the kernel
  meshlet agent --kube --node "$NODE_NAME" --accelerate --cgroup-root /sys/fs/cgroup/kubepods.slice
                                                   follow the cluster: its policies, Services and this node's Pods
  the policy files are re-read when they change (and on SIGHUP): new kernel split weights apply to
  new connections; a file that does not load is logged and the running state is kept. With --kube
  the same holds for every watched policy.
"""
KUBEPODS = "/sys/fs/cgroup/kubepods.slice"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "agent",
        help="node agent: eBPF TCP metrics, HTB QoS classes and the SLO loop (root)",
        description="Load the eBPF programs, export TCP latency histograms, shape traffic per QoSPolicy.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--policy", action="append", default=[], metavar="FILE", help="policy file (repeatable)")
    parser.add_argument("--interface", metavar="IF", help="shape this interface (default: the QoSPolicy's)")
    parser.add_argument("--metrics", default=":15090", metavar="[HOST]:PORT", help="Prometheus listener")
    parser.add_argument("--ports", default="", metavar="P,P,...", help="extra ports to observe besides the policies'")
    parser.add_argument("--interval", default="1s", metavar="DURATION",
                        help="QoS loop period, and how often the policy files are checked for changes (default 1s)")
    parser.add_argument("--pin-dir", default=None, metavar="DIR", help="bpffs directory for pinned maps")
    parser.add_argument("--accelerate", action="store_true", help="sockmap-redirect app<->sidecar loopback sockets")
    parser.add_argument("--cgroup", metavar="DIR", help="workload cgroup v2 the acceleration hooks attach to")
    parser.add_argument("--sidecar-ports", default="15001,15006", metavar="P,P,...", help="default 15001,15006")
    parser.add_argument(
        "--kernel-vip", action="append", default=[], metavar="POLICY=IP:PORT",
        help="virtual address whose connects the kernel splits for a dataplane kernel/auto policy (repeatable)",
    )  # fmt: skip
    cluster = parser.add_argument_group("in a cluster (the agent DaemonSet)")
    cluster.add_argument("--kube", action="store_true",
                         help="follow the cluster's TrafficPolicies, QoSPolicies, Services and this node's Pods")
    cluster.add_argument("--node", default=os.environ.get("NODE_NAME"), metavar="NAME",
                         help="this node's name (default $NODE_NAME)")
    cluster.add_argument("--cgroup-root", default=KUBEPODS, metavar="DIR",
                         help=f"the kubelet's cgroup of Pods (default {KUBEPODS}; cgroupfs driver: .../kubepods)")
    cluster.add_argument("--context", metavar="NAME",
                         help="kubeconfig context (default: the current one, or in-cluster)")
    parser.add_argument("--print-c", action="store_true", help=argparse.SUPPRESS)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.print_c:
        from meshlet.ebpf import source

        print(source.translation_unit(source.HEADER, *source.OBSERVERS, source.CLASSIFIER).decode())
        return 0
    config = _config(args)
    host, port = _listen_address(args.metrics)

    from prometheus_client import CollectorRegistry, start_http_server

    from meshlet.ebpf import capability
    from meshlet.ebpf.agent import AgentError, NodeAgent, stop_on_signals
    from meshlet.k8s.kube import KubeError

    try:
        capability.require()
    except capability.CapabilityMissing as e:
        raise CommandError(f"agent: {e}") from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    registry = CollectorRegistry()
    try:
        source = _cluster_source(args, config) if args.kube else None
    except KubeError as e:
        raise CommandError(f"agent: {e}") from None
    agent = NodeAgent(config, registry, source, strict_start=not args.kube)
    stop_on_signals(agent)
    try:
        server, _ = start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        raise CommandError(f"agent: cannot listen on {args.metrics}: {e.strerror}") from None
    try:
        agent.run(ready=lambda: logging.info("agent: ready, metrics on http://%s:%d/metrics", host, port))
    except (LookupError, AgentError, KubeError) as e:
        raise CommandError(f"agent: {e.args[0]}") from None
    except OSError as e:  # e.g. --pin-dir not on bpffs, or the kernel refusing a qdisc
        raise CommandError(f"agent: {e.strerror or e}: {e.filename or ''}".rstrip(": ")) from None
    finally:
        server.shutdown()
    return 0


def _cluster_source(args: argparse.Namespace, config: AgentConfig) -> ClusterPlans:
    from meshlet.k8s import kube
    from meshlet.k8s.nodewatch import ClusterPlans

    cluster = kube.connect(args.context)
    return ClusterPlans(cluster, args.node, Path(args.cgroup_root), args.interface, config.extra_ports)


def _check_cluster_flags(args: argparse.Namespace) -> None:
    if not args.kube:
        return
    for flag, given in (("--policy", args.policy), ("--kernel-vip", args.kernel_vip), ("--cgroup", args.cgroup)):
        if given:
            raise CommandError(f"agent: {flag} is for a plain host: with --kube the agent follows the cluster's "
                               "policies and finds each meshed Pod's cgroup")
    if not args.node:
        raise CommandError("agent: --kube needs this node's name: --node NAME or $NODE_NAME (the Downward API's "
                           "spec.nodeName)")
    if not Path(args.cgroup_root, "cgroup.procs").is_file():
        raise CommandError(f"agent: --cgroup-root {args.cgroup_root} is not a cgroup v2 directory (the kubelet's "
                           f"cgroup of Pods: {KUBEPODS} with the systemd driver, .../kubepods with cgroupfs)")


def _config(args: argparse.Namespace) -> AgentConfig:
    from meshlet.ebpf.agent import policy_ports
    from meshlet.policy.values import parse_duration

    _check_cluster_flags(args)
    try:
        policies = load_files(args.policy) if args.policy else None
    except PolicyInvalid as e:
        more = f" (and {len(e.errors) - 1} more: meshlet validate shows all)" if len(e.errors) > 1 else ""
        raise CommandError(f"{e.errors[0]}{more}") from None
    print_warnings(policies.warnings if policies else ())
    qos = policies.qos if policies else ()
    if len(qos) > 1:
        raise CommandError(f"agent: one QoSPolicy per node, got {len(qos)}: {', '.join(q.metadata.name for q in qos)}")
    extra = [_port(p.strip(), args.ports) for p in args.ports.split(",") if p.strip()]
    try:
        interval = parse_duration(args.interval)
    except ValueError as e:
        raise CommandError(f"agent: {e}") from None
    ports = policy_ports(qos, policies.traffic if policies else (), extra)
    if len(ports) > 64:
        raise CommandError(f"agent: at most 64 ports can be observed, policies and --ports name {len(ports)}")
    pins = {"pin_dir": Path(args.pin_dir)} if args.pin_dir else {}
    from meshlet.ebpf.acceleration import accel_config

    traffic = policies.traffic if policies else ()
    try:
        accel = accel_config(args.cgroup, args.accelerate, args.sidecar_ports, args.kernel_vip, traffic, args.kube)
    except ValueError as e:
        raise CommandError(f"agent: {e}") from None
    return AgentConfig(ports, qos[0] if qos else None, args.interface, interval, **pins, accel=accel,
                       policy_files=tuple(Path(p) for p in args.policy), kernel_vips=tuple(args.kernel_vip),
                       extra_ports=frozenset(extra))


def _port(text: str, flag: str) -> int:
    if not text.isdigit():
        raise CommandError(f"agent: --ports {flag}: {text!r} is not a port number")
    if not 0 < int(text) < 65536:
        raise CommandError(f"agent: --ports {flag}: ports are 1..65535")
    return int(text)


def _listen_address(spec: str) -> tuple[str, int]:
    host, _, port = spec.rpartition(":")
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise CommandError(f"agent: --metrics {spec}: expected [HOST]:PORT")
    return host or "0.0.0.0", int(port)
