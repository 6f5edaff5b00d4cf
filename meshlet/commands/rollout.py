"""`meshlet rollout start|status|pause|resume|abort|promote POLICY`: drive a sidecar's rollouts.

The rollout runs inside the sidecar (its admin API); this command only asks and prints.
With `--kube`, `status` reads what the rollout leader recorded in the TrafficPolicy's status,
from anywhere kubectl works. Actions still go to a sidecar's admin API: the Lease holder acts on
them at once, under its own clock and apply lock, so the CLI never races the leader by writing
state itself; any other replica answers with the holder's name.
"""

from __future__ import annotations

import argparse
import time
from urllib.parse import quote

from meshlet.commands import CommandError
from meshlet.commands.apply import _call

ACTIONS: tuple[str, ...] = ("start", "status", "pause", "resume", "abort", "promote")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "rollout",
        help="start, watch, pause, resume, abort or promote a canary rollout in a running sidecar",
        description="Progressive delivery: the sidecar steps the canary's weight by its own metrics "
                    "(the route's `rollout` section) and rolls back on breach.",
        epilog="example: meshlet rollout start reviews && meshlet rollout status reviews",
    )
    parser.add_argument("action", choices=ACTIONS)
    parser.add_argument("policy", metavar="POLICY_NAME", help="TrafficPolicy whose route declares a rollout")
    parser.add_argument("--route", help="the route, when the policy has several rollouts")
    parser.add_argument("--sidecar", default="http://127.0.0.1:15000", metavar="URL", help="admin API base URL")
    parser.add_argument("--kube", action="store_true",
                        help="status only: read the state recorded on the TrafficPolicy resource (kubeconfig)")
    parser.add_argument("-n", "--namespace", help="with --kube: the policy's namespace (default: the context's)")
    parser.add_argument("--context", help="with --kube: the kubeconfig context to use")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    url = f"{args.sidecar.rstrip('/')}/rollouts/{quote(args.policy, safe='')}"
    if args.kube:
        status = _kube_status(args)
    elif args.namespace or args.context:
        raise CommandError("--namespace and --context only apply with --kube")
    elif args.action == "status":
        status = _call("GET", url)
    else:
        query = f"?route={quote(args.route, safe='')}" if args.route else ""
        status = _call("POST", f"{url}/{args.action}{query}", b"")
    for line in describe(status):
        print(line)
    return 0


def _kube_status(args: argparse.Namespace) -> dict:
    from meshlet.k8s.kube import KubeError, connect
    from meshlet.policy import PolicyInvalid
    from meshlet.rollout import kube
    from meshlet.rollout.machine import RolloutError

    if args.action != "status":
        raise CommandError(f"--kube reads status only; send {args.action} to the rollout leader's admin API "
                           "(the Pod named in Lease meshlet-rollouts): meshlet rollout "
                           f"{args.action} {args.policy} --sidecar URL")
    try:
        cluster = connect(args.context)
        return kube.status_from(kube.get_policy(cluster, args.namespace, args.policy), args.route)
    except (KubeError, RolloutError) as e:
        raise CommandError(str(e)) from None
    except PolicyInvalid as e:
        raise CommandError(str(e.errors[0])) from None


def describe(status: dict) -> list[str]:
    """Human-readable status: one headline, the last analysis, then the history."""
    steps = status.get("steps", [])
    lines = [
        f"{status['policy']}/{status['route']}: {status['phase']}, step {status['step']}/{len(steps)} "
        f"({' '.join(f'{s}%' for s in steps)}), canary {status['canary']} at {status['weight']}% "
        f"(stable {status['stable']}), failed analyses {status['failures']}/{status['failure_limit']}, "
        f"interval {status['interval']:g}s"
    ]
    last = status.get("last")
    if last:
        rate = "-" if last["success_rate"] is None else f"{last['success_rate']:.2f}%"
        p99 = "-" if last["p99_ms"] is None else f"{last['p99_ms']:.1f}ms"
        reasons = f" ({'; '.join(last['reasons'])})" if last["reasons"] else ""
        lines.append(f"  last analysis: {last['verdict']}: {last['requests']} requests, {last['errors']} errors, "
                     f"success rate {rate}, p99 {p99}{reasons}")
    else:
        lines.append("  last analysis: none yet")
    lines.append("  history:")
    for entry in status.get("history", []):
        at = time.strftime("%H:%M:%S", time.localtime(entry["at"]))
        lines.append(f"    {at} {entry['phase']:<11} {entry['weight']:>3}%  {entry['reason']}")
    return lines
