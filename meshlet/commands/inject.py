"""`meshlet inject -f FILE [-o OUT]`: add the meshlet sidecar to the workloads of a manifest."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from meshlet.commands import CommandError
from meshlet.k8s import flags, manifest
from meshlet.k8s.inject import inject_document


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inject",
        help="add the meshlet sidecar to Kubernetes workloads in a manifest",
        description="Inject the meshlet sidecar into Pods, Deployments, StatefulSets, DaemonSets, ReplicaSets, "
        "Jobs and CronJobs (multi-document files and Lists). Other documents are copied unchanged, in order. "
        'Injecting twice equals injecting once; objects annotated meshlet.dev/inject: "false" are skipped.',
        epilog="example: meshlet inject -f app.yaml | kubectl apply -f -",
    )
    parser.add_argument("-f", "--filename", required=True, metavar="FILE", help="manifest to read ('-' for stdin)")
    parser.add_argument("-o", "--output", metavar="OUT", help="write here instead of stdout")
    parser.add_argument("-q", "--quiet", action="store_true", help="no per-object summary on stderr")
    flags.add_arguments(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    cfg = flags.config_from_args(args)
    text = _read(args.filename)
    try:
        documents = manifest.split(text, "<stdin>" if args.filename == "-" else args.filename)
    except manifest.ManifestError as e:
        raise CommandError(str(e)) from None
    results = []

    def transform(obj: object) -> object:
        new, done = inject_document(obj, cfg)
        results.extend(done)
        return new

    output = manifest.rewrite(documents, transform)
    _write(args.output, output)
    if not args.quiet:
        for result in results:
            if result.outcome != "not-a-workload":
                print(result.describe(), file=sys.stderr)
    return 0


def _read(path: str) -> str:
    try:
        return sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise CommandError(f"{path}: cannot read manifest: {reason}") from None


def _write(path: str | None, text: str) -> None:
    """Write atomically, so `-o` onto the input file never leaves it half-written."""
    if path is None or path == "-":
        sys.stdout.write(text)
        return
    target = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, target)
    except OSError as e:
        raise CommandError(f"{path}: cannot write output: {e.strerror or e}") from None
