"""The access log: one JSON line per request, with the field names of Istio's JSON access log
(Envoy's command operators), so log pipelines built for Istio parse it unchanged.

Off by default: a line costs a JSON encoding and a write per request. Every worker of a
`--workers` sidecar appends to the same file or stdout; a file is opened O_APPEND, and each line
is one write(2), so lines from several processes never interleave.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from meshlet.telemetry.outcome import Outcome

log = logging.getLogger("meshlet.proxy")
ACCESS_LOG_CHOICES = "stdout|FILE|off"


def start_time(seconds: float) -> str:
    """RFC 3339 in UTC with milliseconds, as Envoy's %START_TIME% prints it."""
    whole = int(seconds)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{int((seconds - whole) * 1000):03d}Z"


def entry(o: Outcome) -> dict[str, object]:
    return {
        "start_time": start_time(o.start),
        "method": o.method,
        "authority": o.authority,
        "path": o.path,
        "protocol": o.protocol,
        "response_code": o.code,
        "response_flags": o.flags,
        "bytes_received": o.bytes_received,
        "bytes_sent": o.bytes_sent,
        "duration": round(o.seconds * 1000),
        "upstream_host": o.upstream_host or None,
        "upstream_cluster": o.backend,
        "route_name": o.route,
        "request_id": o.request_id or None,
        "downstream_peer_uri_san": o.peer_identity or None,
        "direction": o.direction,
        "grpc_status": o.grpc_status if o.grpc_status >= 0 else None,
    }


class AccessLog:
    def __init__(self, fd: int, where: str, owned: bool):
        self.fd = fd
        self.where = where
        self.owned = owned
        self.failed = False

    @classmethod
    def open(cls, spec: str) -> AccessLog | None:
        """`off` (None), `stdout`, or a file appended to; OSError names the file."""
        if spec == "off":
            return None
        if spec == "stdout":
            return cls(sys.stdout.fileno(), "stdout", owned=False)
        try:
            fd = os.open(spec, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as e:
            raise OSError(f"--access-log {spec}: {e.strerror}") from None
        return cls(fd, spec, owned=True)

    def write(self, outcome: Outcome) -> None:
        line = json.dumps(entry(outcome), separators=(",", ":"), ensure_ascii=False) + "\n"
        try:
            os.write(self.fd, line.encode("utf-8", "surrogateescape"))
        except OSError as e:  # a full disk or a closed pipe must not fail requests: say so once
            if not self.failed:
                self.failed = True
                log.warning("access log %s: %s; lines are being lost", self.where, e.strerror or e)
            return
        self.failed = False

    def close(self) -> None:
        if self.owned:
            os.close(self.fd)
