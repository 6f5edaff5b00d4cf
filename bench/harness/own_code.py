"""meshlet's own code per request: the lean engine's micro-benchmark, run from the load benchmark.

The figure comes from `tests/unit/proxy/test_lean_speed.py` (pytest-benchmark), the engine's
callbacks over in-memory transports, so the load benchmark and `make test` print the same thing.
It runs in its own process after the load, on a machine with nothing else of the run busy.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from harness.goals import OWN_CODE_TEST

REPO = Path(__file__).resolve().parents[2]
TEST = f"{OWN_CODE_TEST}::TestLeanSpeed::test_one_get_through_a_pooled_connection"


def seconds_per_request(max_time: float) -> float:
    """The benchmark's median; RuntimeError naming the failure when it does not run."""
    with tempfile.TemporaryDirectory(prefix="meshlet-bench-own-") as tmp:
        out = Path(tmp) / "benchmark.json"
        argv = [sys.executable, "-m", "pytest", TEST, "-q", "-p", "no:cacheprovider", f"--benchmark-json={out}",
                f"--benchmark-max-time={max_time:g}", "--benchmark-min-rounds=1000"]
        done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300 + max_time)
        if done.returncode or not out.exists():
            lines = (done.stdout + done.stderr).strip().splitlines()
            # pytest's first `E ` line is the failed assertion or the error; else its summary line
            why = next((line[1:].strip() for line in lines if line.startswith("E ")), lines[-1] if lines else "")
            raise RuntimeError(f"{OWN_CODE_TEST} failed: {why or 'no output'}")
        return json.loads(out.read_text())["benchmarks"][0]["stats"]["median"]
