"""`meshlet agent`'s acceleration flags: bad input is one line and exit 1, before anything is loaded."""

from __future__ import annotations

import pytest

from meshlet.cli import main

KERNEL_POLICY = """\
apiVersion: meshlet.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: reviews}
spec:
  host: reviews
  dataplane: kernel
  backends:
    v1: {address: "127.0.0.1:9081"}
  routes:
    - name: all
      to: [{backend: v1, weight: 100}]
"""


@pytest.fixture
def policy(tmp_path):
    path = tmp_path / "reviews.yaml"
    path.write_text(KERNEL_POLICY)
    return path


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--accelerate"], "meshlet: agent: --accelerate and --kernel-vip need --cgroup DIR"),
        (
            ["--accelerate", "--cgroup", "/nonexistent"],
            "meshlet: agent: --cgroup /nonexistent: /nonexistent is not a cgroup v2 directory",
        ),
        (["--kernel-vip", "reviews"], "meshlet: agent: --kernel-vip 'reviews': expected POLICY=IPV4:PORT"),
        (
            ["--kernel-vip", "ratings=127.0.0.1:9080"],
            "meshlet: agent: --kernel-vip names no loaded TrafficPolicy: ratings",
        ),
    ],
)
def test_bad_acceleration_flags_are_one_line(flags, message, capsys):
    assert main(["agent", "--metrics", "127.0.0.1:0", *flags]) == 1
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_a_kernel_policy_without_a_vip_points_at_the_policy(policy, capsys):
    assert main(["agent", "--metrics", "127.0.0.1:0", "--policy", str(policy)]) == 1
    err = capsys.readouterr().err
    assert (
        err
        == f"meshlet: agent: {policy}:5:3: policy reviews has dataplane kernel but no virtual address: set spec.vip or pass --kernel-vip reviews=IP:PORT\n"
    )


def test_sidecar_ports_must_be_ports(policy, capsys, tmp_path):
    cgroup = tmp_path / "cg"
    cgroup.mkdir()
    (cgroup / "cgroup.controllers").write_text("")  # looks like a cgroup v2 directory
    flags = ["--accelerate", "--cgroup", str(cgroup), "--sidecar-ports", "15001,http"]
    assert main(["agent", "--metrics", "127.0.0.1:0", *flags]) == 1
    assert (
        capsys.readouterr().err
        == "meshlet: agent: --sidecar-ports 15001,http: 'http' is not a port number (1..65535)\n"
    )
