"""`meshlet` entry point: builds the argument parser from the command modules and dispatches.

Each command lives in `meshlet/commands/NAME.py` with a `register(subparsers)` function that
adds its parser and sets `handler`. Command modules import their heavy dependencies
(mitmproxy, bcc, pyroute2) inside the handler, so `meshlet validate` starts in milliseconds.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from meshlet import __version__
from meshlet.commands import CommandError
from meshlet.proxy.optimize import reexec_optimized

# One line per command module; order is the order of `meshlet --help`.
COMMAND_MODULES: tuple[str, ...] = (
    "meshlet.commands.validate",
    "meshlet.commands.apply",
    "meshlet.commands.run",
    "meshlet.commands.demo",
    "meshlet.commands.rollout",
    "meshlet.commands.ca",
    "meshlet.commands.cert",
    "meshlet.commands.identity",
    "meshlet.commands.agent",
    "meshlet.commands.stats",
    "meshlet.commands.tap",
    "meshlet.commands.inject",
    "meshlet.commands.webhook",
)


class Parser(argparse.ArgumentParser):
    """No abbreviated options: `--metrics` must not quietly mean `--metrics-compat`, nor a
    flag added later change what an old abbreviation meant. Sub-parsers inherit the class."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="meshlet",
        description="Traffic-shaping sidecar and service-mesh policy engine.",
    )
    parser.add_argument("--version", action="version", version=f"meshlet {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def _reexec_optimized(args: argparse.Namespace) -> None:
    """A command that serves requests in this process (`run --workers 1`) sets `optimize`: the
    same command line runs again under `python -O` (meshlet.proxy.optimize)."""
    wants = getattr(args, "optimize", None)
    if wants is None or not wants(args):
        return
    # The console script again when that is what ran, so `ps` and `pkill -f "meshlet run"` still match.
    entry = [sys.argv[0]] if os.path.basename(sys.argv[0]) == "meshlet" else ["-m", "meshlet.cli"]
    reexec_optimized([*entry, *sys.argv[1:]])


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None:  # the real command line, not a call from Python (tests)
        _reexec_optimized(args)
    try:
        return int(args.handler(args) or 0)
    except CommandError as e:
        print(f"meshlet: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
