"""`meshlet apply FILE`: validate locally, show the change, replace a running sidecar's policy."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request

from meshlet.commands import CommandError, print_warnings, refused
from meshlet.policy import PolicyInvalid, load_file, load_text
from meshlet.policy.diff import diff

TIMEOUT = 10.0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "apply",
        help="validate a policy and apply it to a running sidecar (PUT /policy)",
        description="Validate FILE, print what changes against the sidecar's current policy, then apply it.",
        epilog="example: meshlet apply policies/ab-test.yaml --sidecar http://127.0.0.1:15000",
    )
    parser.add_argument("file", metavar="FILE", help="policy YAML")
    parser.add_argument("--sidecar", default="http://127.0.0.1:15000", metavar="URL", help="admin API base URL")
    parser.add_argument("--dry-run", action="store_true", help="validate and show the change; apply nothing")
    kube = parser.add_argument_group("Kubernetes", "--kube: apply as TrafficPolicy/QoSPolicy resources instead")
    kube.add_argument("--kube", action="store_true", help="server-side apply to the cluster of your kubeconfig")
    kube.add_argument("--context", help="kubeconfig context (default: the current one)")
    kube.add_argument("-n", "--namespace", help="for documents that name none (default: the context's)")
    parser.set_defaults(handler=run)


def _call(method: str, url: str, body: bytes | None = None) -> dict:
    request = urllib.request.Request(url, data=body, method=method, headers={"content-type": "application/yaml"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        try:
            errors = json.loads(e.read()).get("errors", [])
        except ValueError:
            errors = []
        for error in errors[:-1]:
            print(error, file=sys.stderr)
        raise CommandError(errors[-1] if errors else f"{method} {url}: HTTP {e.code}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise CommandError(f"sidecar unreachable at {url}: {reason}") from None
    except ValueError:
        raise CommandError(f"{method} {url}: the answer is not JSON (is this a meshlet admin API?)") from None


def run(args: argparse.Namespace) -> int:
    if args.kube:
        return _run_kube(args)
    try:
        new = load_file(args.file)
        with open(args.file, "rb") as f:
            body = f.read()
    except PolicyInvalid as e:
        raise refused(e) from None
    except OSError as e:
        raise CommandError(f"{args.file}: {e.strerror}") from None
    print_warnings(new.warnings)  # the sidecar's answer repeats them for its own copy: not printed twice
    base = args.sidecar.rstrip("/")
    current = _call("GET", f"{base}/policy")
    try:
        old = load_text(current.get("policy", ""), "sidecar")
    except PolicyInvalid:
        old = None
    lines = diff(old, new) if old is not None else ["(the sidecar's current policy could not be read back)"]
    print(f"generation {current.get('generation')}: " + ("changes:" if lines else "no changes"))
    for line in lines:
        print(f"  {line}")
    if args.dry_run:
        print("dry run: nothing applied")
        return 0
    answer = _call("PUT", f"{base}/policy", body)
    print(f"applied: generation {answer.get('generation')}")
    for note in answer.get("rollouts", []):  # rollouts the apply kept or cancelled
        print(f"  {note}")
    return 0


def _run_kube(args: argparse.Namespace) -> int:
    from meshlet.k8s.kube import KubeError, apply_file

    if args.dry_run:
        raise CommandError("--dry-run with --kube: use kubectl apply --server-side --dry-run=server")
    try:
        for line in apply_file(args.file, args.context, args.namespace):
            print(line)
    except PolicyInvalid as e:
        raise refused(e) from None
    except KubeError as e:
        raise CommandError(str(e)) from None
    return 0
