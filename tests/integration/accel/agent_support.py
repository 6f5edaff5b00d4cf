"""What the tests of `meshlet agent` as a process share: a kernel-split policy, free ports,
metrics scraping, which programs a cgroup has attached, and the driver of `workload.py`."""

from __future__ import annotations

import json
import selectors
import socket
import subprocess
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from meshlet.ebpf import bpfsys

CGROUP_SOCK_OPS, CGROUP_INET4_CONNECT = 3, 10
REPLY_TIMEOUT = 60.0

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


class Workload:
    """One `workload.py` process; `call` sends a command line and returns its JSON answer."""

    def __init__(self, argv: list[str]) -> None:
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.process.stdout, selectors.EVENT_READ)  # type: ignore[arg-type]

    def call(self, command: str, timeout: float = REPLY_TIMEOUT) -> dict:
        assert self.process.stdin and self.process.stdout
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        if not self._selector.select(timeout):
            raise TimeoutError(f"workload gave no answer to {command!r} within {timeout}s")
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"workload exited ({self.process.poll()}) on {command!r}")
        return json.loads(line)

    def close(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)
        self._selector.close()
        for stream in (self.process.stdin, self.process.stdout):
            if stream:
                stream.close()
