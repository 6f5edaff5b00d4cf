"""`meshlet validate FILE...`: check policy files offline, as an editor or CI step would."""

from __future__ import annotations

import argparse
import sys

from meshlet.commands import print_warnings
from meshlet.policy import PolicyInvalid, load_file
from meshlet.policy.model import PolicySet, TrafficPolicy


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "validate",
        help="check policy files; print FILE:LINE:COL: message per error",
        description="Validate meshlet policy files. Exit 0 when every file is valid, 1 otherwise. "
                    "Warnings (FILE:LINE:COL: warning: message, e.g. a deprecated field) do not fail a file.",
        epilog="example: meshlet validate policies/*.yaml",
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help="policy YAML files (several documents each)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    failed = False
    for path in args.files:
        try:
            policies = load_file(path)
        except PolicyInvalid as e:
            failed = True
            print_warnings(e.warnings)
            for error in e.errors:
                print(error, file=sys.stderr)
            continue
        print_warnings(policies.warnings)
        print(f"{path}: valid ({summarize(policies)})")
    return 1 if failed else 0


def summarize(policies: PolicySet) -> str:
    parts = []
    for policy in policies.traffic:
        routes = len(policy.routes)
        parts.append(f"TrafficPolicy {policy.metadata.name} host={policy.host} {routes} route{'s' * (routes != 1)}"
                     f"{dataplane(policy)}")
    for qos in policies.qos:
        parts.append(f"QoSPolicy {qos.metadata.name} on {qos.interface} {len(qos.classes)} classes")
    return "; ".join(parts)


def dataplane(policy: TrafficPolicy) -> str:
    """Where `auto` puts the policy, and what keeps it in the proxy (the same rule the agent applies)."""
    from meshlet.ebpf.kernel_split import needs_l7

    if policy.dataplane != "auto":
        return "" if policy.dataplane == "proxy" else ", dataplane kernel"
    found = needs_l7(policy)
    if found is None:
        return ", dataplane auto: kernel"
    mark, reason = found
    return f", dataplane auto: proxy ({reason}, at {mark})"
