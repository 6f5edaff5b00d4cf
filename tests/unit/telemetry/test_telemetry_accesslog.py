"""The access log's lines: Istio's JSON field names, one write per line, failures that don't fail requests."""

from __future__ import annotations

import json
import os

import pytest

from meshlet.telemetry.accesslog import AccessLog, start_time
from meshlet.telemetry.outcome import Outcome


def outcome(**changes) -> Outcome:
    fields = dict(direction="outbound", route="canary", backend="v2", service="reviews", code=200, flags="-",
                  seconds=0.0123, start=1764620000.5, method="GET", authority="reviews:9080", path="/r/1?x=ü",
                  bytes_received=3, bytes_sent=120, upstream_host="10.0.0.2:9080", request_id="abc",
                  peer_identity="")
    fields.update(changes)
    return Outcome(**fields)


def test_off_is_no_log():
    assert AccessLog.open("off") is None


def test_lines_carry_istio_field_names(tmp_path):
    path = tmp_path / "access.log"
    log = AccessLog.open(str(path))
    log.write(outcome())
    log.write(outcome(code=0, flags="DC", grpc_status=14, peer_identity="spiffe://cluster.local/ns/a/sa/b"))
    log.close()
    first, second = (json.loads(line) for line in path.read_text("utf-8").splitlines())
    assert first == {
        "start_time": "2025-12-01T20:13:20.500Z", "method": "GET", "authority": "reviews:9080", "path": "/r/1?x=ü",
        "protocol": "HTTP/1.1", "response_code": 200, "response_flags": "-", "bytes_received": 3,
        "bytes_sent": 120, "duration": 12, "upstream_host": "10.0.0.2:9080", "upstream_cluster": "v2",
        "route_name": "canary", "request_id": "abc", "downstream_peer_uri_san": None, "direction": "outbound",
        "grpc_status": None,
    }
    assert (second["response_code"], second["response_flags"], second["grpc_status"]) == (0, "DC", 14)
    assert second["downstream_peer_uri_san"] == "spiffe://cluster.local/ns/a/sa/b"


def test_a_file_is_appended_to(tmp_path):
    path = tmp_path / "access.log"
    path.write_text("earlier\n")
    log = AccessLog.open(str(path))
    log.write(outcome())
    log.close()
    assert path.read_text().startswith("earlier\n") and len(path.read_text().splitlines()) == 2


def test_an_unwritable_file_is_one_line(tmp_path):
    with pytest.raises(OSError, match=r"^--access-log .*/nope/access.log: No such file or directory$"):
        AccessLog.open(str(tmp_path / "nope" / "access.log"))


def test_a_broken_pipe_loses_lines_but_not_requests(caplog):
    read, write = os.pipe()
    os.close(read)
    log = AccessLog(write, "stdout", owned=True)
    log.write(outcome())
    log.write(outcome())
    log.close()
    assert [r.message for r in caplog.records].count("access log stdout: Broken pipe; lines are being lost") == 1


def test_start_time_is_rfc3339_utc_milliseconds():
    assert start_time(0.25) == "1970-01-01T00:00:00.250Z"
