"""`meshlet validate` as users run it: the installed entry point, a real process, exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).parents[3]
MESHLET = Path(sys.executable).parent / "meshlet"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(MESHLET), *args], capture_output=True, text=True, timeout=60, cwd=REPO)


def test_examples_are_valid():
    examples = sorted(str(p) for p in (REPO / "policies").glob("*.yaml"))
    result = run("validate", *examples)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(": valid (") == len(examples)
    assert result.stderr == ""  # no example uses a deprecated field


def test_weight_typo_prints_file_line_col_and_exits_1(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text((REPO / "policies" / "canary.yaml").read_text().replace("weight: 10}", "weight: 100}"))
    result = run("validate", str(bad))
    assert result.returncode == 1
    assert result.stderr.strip() == f"{bad}:13:12: route 'canary': weights sum to 190, must be 100"
    assert "Traceback" not in result.stderr


def test_good_and_bad_files_together(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: [\n")
    result = run("validate", str(REPO / "policies" / "canary.yaml"), str(bad))
    assert result.returncode == 1
    assert "canary.yaml: valid" in result.stdout
    assert result.stderr.startswith(f"{bad}:2:1: malformed YAML")


def test_missing_file():
    result = run("validate", "/nonexistent/policy.yaml")
    assert result.returncode == 1
    assert result.stderr.strip() == "/nonexistent/policy.yaml:1:1: cannot read policy file: No such file or directory"


def test_a_deprecated_field_warns_and_exits_0(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text((REPO / "policies" / "canary.yaml").read_text().replace("retryOn:", "on:"))
    result = run("validate", str(old))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{old}: valid (TrafficPolicy reviews host=reviews 1 route)\n"
    assert result.stderr.splitlines() == [
        f"{old}:15:30: warning: TrafficPolicy 'reviews' spec.routes[0].retries: 'on' is deprecated, write 'retryOn': "
        "YAML 1.1 readers such as kubectl's read a bare `on:` key as the boolean true"]


def test_warnings_are_printed_with_the_errors_of_an_invalid_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "policies" / "canary.yaml").read_text().replace("retryOn:", "on:").replace("5xx", "5xxx"))
    result = run("validate", str(bad))
    assert result.returncode == 1
    warning, error = result.stderr.splitlines()
    assert warning.startswith(f"{bad}:15:30: warning: ") and error.startswith(f"{bad}:15:52: ")
    assert "'5xxx' is not one of" in error
def test_validate_says_where_dataplane_auto_runs_and_why(tmp_path):
    auto = tmp_path / "auto.yaml"
    auto.write_text("""\
apiVersion: meshlet.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: reviews}
spec:
  host: reviews
  dataplane: auto
  backends: {v1: {address: "reviews-v1:9080"}, v2: {address: "reviews-v2:9080"}}
  routes: [{name: canary, to: [{backend: v1, weight: 90}, {backend: v2, weight: 10}]}]
---
apiVersion: meshlet.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: ratings}
spec:
  host: ratings
  dataplane: auto
  backends: {v1: {address: "ratings:9080"}}
  routes:
    - name: beta
      match: {headers: {x-group: beta}}
      to: [{backend: v1}]
    - name: all
      to: [{backend: v1}]
""")
    result = run("validate", str(auto))
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        f"{auto}: valid (TrafficPolicy reviews host=reviews 1 route, dataplane auto: kernel; "
        f"TrafficPolicy ratings host=ratings 2 routes, dataplane auto: proxy "
        f"(2 routes: the kernel splits one default route, at {auto}:14:3))\n"
    )
