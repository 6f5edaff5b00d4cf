"""`meshlet agent` and `meshlet stats` refusing bad input: one line, exit 1, before touching the kernel."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

MESHLET = Path(sys.executable).parent / "meshlet"
REPO = Path(__file__).parents[3]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(MESHLET), *args], capture_output=True, text=True, timeout=60, cwd=REPO)


def test_bad_policy_names_file_line_col(tmp_path):
    bad = tmp_path / "qos.yaml"
    bad.write_text((REPO / "policies" / "qos.yaml").read_text().replace("rate: 10mbit", "rate: fast"))
    result = run("agent", "--policy", str(bad))
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"meshlet: {bad}:11:34: ") and "bad rate 'fast'" in line


def test_bad_flags_are_one_line_errors():
    cases = {
        ("--ports", "80,x"): "meshlet: agent: --ports 80,x: 'x' is not a port number",
        ("--ports", "70000"): "meshlet: agent: --ports 70000: ports are 1..65535",
        ("--interval", "5"): "meshlet: agent: bad duration '5'",
        ("--metrics", "localhost"): "meshlet: agent: --metrics localhost: expected [HOST]:PORT",
    }
    for args, expected in cases.items():
        result = run("agent", *args)
        assert result.returncode == 1, args
        assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(expected), (args, result.stderr)


def test_stats_without_an_agent_says_so():
    result = run("stats", "--once", "--agent", "http://127.0.0.1:9")
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("meshlet: stats: cannot read http://127.0.0.1:9/metrics") and "meshlet agent" in line


def test_cluster_flags_are_checked_before_anything_is_loaded(tmp_path):
    cases = {
        ("--kube",): "meshlet: agent: --kube needs this node's name: --node NAME or $NODE_NAME",
        ("--kube", "--node", "n1", "--policy", "policies/qos.yaml"): "meshlet: agent: --policy is for a plain host",
        ("--kube", "--node", "n1", "--cgroup", "pod1"): "meshlet: agent: --cgroup is for a plain host",
        ("--kube", "--node", "n1", "--cgroup-root", str(tmp_path)):
            f"meshlet: agent: --cgroup-root {tmp_path} is not a cgroup v2 directory",
    }
    for args, expected in cases.items():
        result = subprocess.run([str(MESHLET), "agent", *args], capture_output=True, text=True, timeout=60, cwd=REPO,
                                env={**os.environ, "NODE_NAME": ""})
        assert result.returncode == 1, args
        assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(expected), (args, result.stderr)
