"""Plays the node agent for the kill -9 test: attaches both accelerations, reports, then sleeps.

argv: CGROUP_PATH PIN_ROOT SIDECAR_PORT VIP_PORT BACKEND_PORT
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from meshlet.ebpf.accel import SockmapAccelerator
from meshlet.ebpf.cgroup import Cgroup
from meshlet.ebpf.kernel_split import KernelSplit, KernelSplitter, SplitBackend
from meshlet.policy.model import Address


def main() -> None:
    cgroup, pin_root = Cgroup(Path(sys.argv[1])), Path(sys.argv[2])
    sidecar_port, vip_port, backend_port = map(int, sys.argv[3:6])
    accel = SockmapAccelerator(ports={sidecar_port}, pin_dir=pin_root / "accel")
    accel.start()
    accel.set_targets([cgroup.path])
    splitter = KernelSplitter(pin_root / "split")
    splitter.start()
    splitter.set_targets({cgroup.path: 0})
    backend = SplitBackend("default", "v1", Address("127.0.0.1", backend_port), 100)
    splitter.apply([KernelSplit("reviews", Address("127.0.0.1", vip_port), (backend,))])
    ids = {"sockops": accel.hooks.prog_id("meshlet_sockops"), "connect4": splitter.hooks.prog_id("meshlet_connect4")}
    print(json.dumps(ids), flush=True)
    time.sleep(600)  # the test kills us with SIGKILL long before this


if __name__ == "__main__":
    main()
