"""`meshlet tap --save FILE`: tap records as mitmproxy flows, so `mitmproxy -r FILE` opens them.

A tap record is what the sidecar let out of its request path: the request line, the
authority, the status and timing, and meshlet's decision; never other headers or bodies. So a
saved flow has a request with its Host (and `x-request-id` when there was one), a response
with its status, bodies marked missing, and the rest in `flow.metadata["meshlet"]` and the
flow's comment, which mitmproxy shows. Either engine's records save the same way.
"""

from __future__ import annotations

from typing import BinaryIO

from mitmproxy import connection, flow, http, io
from mitmproxy.net.http import status_codes, url

from meshlet.proxy.tap import TapRecord

NO_RESPONSE = "no response reached the client"


def _address(authority: str) -> tuple[str, int]:
    try:
        host, port = url.parse_authority(authority, check=True)
    except ValueError:
        return authority, 80
    return host, port or 80


def record_flow(record: TapRecord) -> http.HTTPFlow:
    start, end = record.start, record.start + record.seconds
    host, port = _address(record.authority)
    client = connection.Client(peername=("0.0.0.0", 0), sockname=("0.0.0.0", 0), timestamp_start=start)
    client.timestamp_end = end
    server = connection.Server(address=(host, port))
    headers = [(b"host", record.authority.encode())]
    if record.request_id:
        headers.append((b"x-request-id", record.request_id.encode()))
    saved = http.HTTPFlow(client, server)
    saved.timestamp_created = start
    saved.request = http.Request(
        host, port, record.method.encode(), b"http", b"", record.path.encode(), b"HTTP/1.1",
        http.Headers(headers), None, None, start, start,
    )
    if record.status:
        reason = status_codes.RESPONSES.get(record.status, "").encode()
        saved.response = http.Response(b"HTTP/1.1", record.status, reason, http.Headers(), None, None, end, end)
    else:
        saved.error = flow.Error(NO_RESPONSE, end)
    saved.metadata["meshlet"] = {
        "direction": record.direction, "route": record.route, "backend": record.backend,
        "peer_identity": record.peer_identity, "request_id": record.request_id, "seconds": record.seconds,
    }
    peer = f" peer={record.peer_identity}" if record.peer_identity else ""
    saved.comment = f"meshlet {record.direction}: route={record.route} backend={record.backend}{peer}"
    return saved


class FlowFile:
    """Flows written one by one and flushed, so the file is whole whenever `meshlet tap` stops."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.writer = io.FlowWriter(stream)

    def add(self, record: TapRecord) -> None:
        self.writer.add(record_flow(record))
        self.stream.flush()
