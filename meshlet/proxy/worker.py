"""One worker process of `meshlet run --workers N` (run as `python -m meshlet.proxy.worker`).

The supervisor writes `{"config": ..., "policy": TEXT, "generation": N}` to stdin; the worker
binds the shared listeners with SO_REUSEPORT (`config.reuse_port`), its admin API on a private loopback port, and
answers one JSON line on stdout: `{"ready": {...}}` or `{"error": "one line"}`.
Metrics go to the supervisor's PROMETHEUS_MULTIPROC_DIR (set in our environment).
A worker runs optimized (`-O`, re-executing itself if started without: meshlet.proxy.optimize).
"""

from __future__ import annotations

import json
import sys

from meshlet.policy import PolicyInvalid
from meshlet.proxy.optimize import reexec_optimized


def _say(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def main() -> int:
    reexec_optimized(["-m", "meshlet.proxy.worker"])  # stdin (the job) is kept
    from meshlet.mtls.files import IdentityError
    from meshlet.proxy.config import config_from_json
    from meshlet.proxy.serve import StartupError, run_serve, setup_logging
    from meshlet.proxy.state import compile_policy

    job = json.loads(sys.stdin.readline())
    setup_logging()
    try:
        applied = compile_policy(job["policy"], int(job["generation"]), "policy", job.get("weights"))
        return run_serve(config_from_json(job["config"]), applied, lambda addrs: _say({"ready": addrs}))
    except (StartupError, PolicyInvalid, IdentityError) as e:
        _say({"error": str(e).splitlines()[0]})
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
