"""What the tests of `meshlet agent` as a process share: a kernel-split policy, free ports,
metrics scraping and which programs a cgroup has attached."""

from __future__ import annotations

import socket
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from meshlet.ebpf import bpfsys

CGROUP_SOCK_OPS, CGROUP_INET4_CONNECT = 3, 10

POLICY = """\
apiVersion: meshlet.dev/v1alpha1
kind: TrafficPolicy
metadata: {{name: reviews}}
spec:
  host: reviews
  dataplane: kernel
  backends:
    v1: {{address: "127.0.0.1:{v1}"}}
    v2: {{address: "127.0.0.1:{v2}"}}
  routes:
    - name: canary
      to: [{{backend: v1, weight: 50}}, {{backend: v2, weight: 50}}]
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def samples(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def attached(cgroup, attach_type: int) -> tuple[int, ...]:
    with cgroup.fd() as fd:
        return bpfsys.attached_ids(fd, attach_type)
