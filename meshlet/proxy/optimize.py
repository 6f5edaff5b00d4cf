"""Serve requests under `python -O`, re-executing in place when started without it.

mitmproxy type-checks every field of every request and response it builds, and asserts
throughout its proxy core, only `if __debug__` (about a quarter of a worker's throughput; see
meshlet.proxy.mitm.dispatch). Whatever serves requests — a `--workers` worker, or `meshlet run --workers 1`
itself — runs the same program again with `-O`: same pid, so signals and Pod probes still reach
it. MESHLET_WORKER_DEBUG=1 keeps the checks on.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

DEBUG_ENV = "MESHLET_WORKER_DEBUG"


def reexec_optimized(entry: Sequence[str]) -> None:
    """Replace this process by `python -O ENTRY...` unless already optimized or debugging.

    `entry` is what follows the interpreter's flags (a script path, or `-m MODULE`) plus the
    arguments. Returns only when no re-exec is wanted, or when it was refused (an interpreter
    path this user may not execute again): then it serves on unoptimized, and says so.
    """
    if sys.flags.optimize or os.environ.get(DEBUG_ENV):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(sys.executable, [sys.executable, "-O", *entry])
    except OSError as e:
        print(f"meshlet: serving without -O: cannot re-execute {sys.executable}: {e.strerror}", file=sys.stderr)
