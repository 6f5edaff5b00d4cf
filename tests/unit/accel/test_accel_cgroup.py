"""Starting a process inside a cgroup: the wrapper joins before exec, with no window outside."""

from __future__ import annotations

import subprocess
from pathlib import Path

from meshlet.ebpf.cgroup import Cgroup, create, remove


def test_command_joins_the_cgroup_then_execs_the_argv_unchanged(tmp_path: Path):
    # A plain directory stands in for the cgroup: the wrapper only writes its pid to cgroup.procs.
    cgroup = Cgroup(tmp_path)
    out = subprocess.run(
        cgroup.command(["/bin/sh", "-c", 'echo "$$ $1"', "sh", "arg with space"]),
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout.split(maxsplit=1)
    assert (tmp_path / "cgroup.procs").read_text().strip() == out[0]  # same pid: exec, not a child
    assert out[1].strip() == "arg with space"


def test_create_and_remove_a_plain_directory_hierarchy(tmp_path: Path):
    cgroup = create("child", root=tmp_path)
    assert cgroup.path.is_dir() and cgroup.pids() == ()
    remove(cgroup)
    assert not cgroup.path.exists()
