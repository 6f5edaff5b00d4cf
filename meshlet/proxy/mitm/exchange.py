"""One request's bookkeeping on the mitmproxy engine, and the `Outcome` it ends as.

mitmproxy ends every flow with either its `response` hook (the client has the whole response)
or its `error` hook, which does not say which side failed or whether the client got anything.
`failure` reads that from the state mitmproxy leaves behind:
- the client is gone when its connection can no longer be read (mitmproxy closes it before
  raising a client-side error) or, on HTTP/2, the client reset the stream;
- a response whose head went out (`stream` set) keeps its status; otherwise mitmproxy answers a
  live client 502 itself, after a backend that never connected (UF) or that closed (UC).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from mitmproxy import flow as mflow
from mitmproxy import http
from mitmproxy.connection import ConnectionState

from meshlet.policy.model import Backend
from meshlet.proxy import peermeta
from meshlet.proxy.tap import TapRecord
from meshlet.routing import Decision
from meshlet.telemetry.outcome import (
    DOWNSTREAM_DISCONNECT,
    NO_FLAGS,
    UPSTREAM_CONNECT_FAILURE,
    UPSTREAM_CONNECTION_TERMINATION,
    Outcome,
    Workload,
)

KEY = "meshlet"
REFUSED = "meshlet.refused"  # flow.metadata mark: the mTLS addon answered this request 403
CLIENT_RESET = "stream reset by client"  # mitmproxy's error for an HTTP/2 stream the client cancelled


@dataclass(slots=True)
class Exchange:
    """Per-request bookkeeping kept in `flow.metadata[KEY]`, dropped with the flow.

    An attempt sent on mitmproxy's own (streaming) path is `attempting` until the flow ends, when
    it is counted with what came of it; attempts of meshlet's buffered client are counted as they
    end. `received`/`sent` count streamed body bytes (the stream callables below)."""

    direction: str
    route: str
    backend: str
    service: str
    started: float  # perf_counter() at the request head
    start: float  # time.time() at the request head
    decision: Decision | None = None
    buffered: bool = False
    done: bool = False
    flags: str = NO_FLAGS  # why the sidecar answered itself (Envoy response flags)
    last: Backend | None = None  # the backend of the last attempt
    attempting: bool = False
    attempt_started: float = 0.0
    upstream_code: int = 0  # the status that attempt's backend answered (0: none yet)
    upstream: str = ""  # host:port of the last attempt
    peer: Workload | None = None  # the other side of the hop, as its own metadata says (None: not said)
    mtls: bool = False  # inbound: the caller was verified by mesh mTLS
    received: int = 0
    sent: int = 0

    def request_chunk(self, data: bytes) -> bytes:
        """`flow.request.stream`: passes each chunk on, counted."""
        self.received += len(data)
        return data

    def response_chunk(self, data: bytes) -> bytes:
        """`flow.response.stream`: passes each chunk on, counted."""
        self.sent += len(data)
        return data

    def begin(self, address: tuple[str, int]) -> None:
        """An attempt goes out on mitmproxy's path, to `address`."""
        self.attempting = True
        self.attempt_started = time.perf_counter()
        self.upstream = f"{address[0]}:{address[1]}"

    def other_side(self) -> Workload | None:
        """The peer: as its own metadata says, else as the last attempt's backend declares itself."""
        if self.peer is None and self.last is not None:
            self.peer = peermeta.declared(self.last)
        return self.peer


def head_sent(response: http.Response | None) -> bool:
    """The response head went to the client: mitmproxy sends it as soon as a response streams."""
    return response is not None and bool(response.stream)


def downstream_gone(flow: http.HTTPFlow) -> bool:
    error = flow.error
    if not flow.client_conn.state & ConnectionState.CAN_READ:
        return True
    return error is not None and error.msg.startswith(CLIENT_RESET)


def failure(flow: http.HTTPFlow) -> tuple[int, str]:
    """(status the client got, response flags) of a flow mitmproxy ended with an error."""
    response = flow.response
    sent = head_sent(response)
    status = response.status_code if sent and response is not None else 0
    if flow.error is not None and flow.error.msg == mflow.Error.KILLED_MESSAGE:
        return status, NO_FLAGS  # killed by an addon: mitmproxy sends nothing more
    if downstream_gone(flow):
        return status, DOWNSTREAM_DISCONNECT
    if sent:
        return status, UPSTREAM_CONNECTION_TERMINATION
    connected = flow.server_conn.timestamp_tcp_setup is not None
    return 502, UPSTREAM_CONNECTION_TERMINATION if connected else UPSTREAM_CONNECT_FAILURE


def grpc_status(flow: http.HTTPFlow) -> int:
    """The call's grpc-status (trailers, or a trailers-only response's headers); -1 when not gRPC."""
    response, request = flow.response, flow.request
    if response is None or not request.is_http2 or not field(request, b"content-type").startswith("application/grpc"):
        return -1
    for fields in (response.trailers, response.headers):
        value = fields.get("grpc-status") if fields is not None else None
        if value is not None:
            return int(value) if value.isdigit() else -1
    return -1


def field(message: http.Message, name: bytes) -> str:
    """The first value of field `name` (lower case), read from the raw fields ("" when absent)."""
    for key, value in message.data.headers.fields:
        if key.lower() == name:
            return value.decode("latin-1")
    return ""


def body_size(message: http.Message | None) -> int:
    """Bytes of a body held whole (a streamed one is counted chunk by chunk instead, and has none)."""
    return len(message.raw_content or b"") if message is not None else 0


def outcome(
    flow: http.HTTPFlow, exchange: Exchange, code: int, flags: str, seconds: float, peer_identity: str,
    with_peer: bool = True,
) -> Outcome:
    """`with_peer` False leaves a peer nobody said anything of unnamed (only Istio's labels read it)."""
    request = flow.request
    return Outcome(
        exchange.direction, exchange.route, exchange.backend, exchange.service, code, flags, seconds,
        exchange.start, request.method, request.host_header or request.pretty_host, request.path,
        "HTTP/2" if request.is_http2 else "HTTP/1.1", grpc_status(flow),
        exchange.received + body_size(request), exchange.sent + (body_size(flow.response) if code else 0),
        exchange.upstream, field(request, b"x-request-id"), peer_identity,
        exchange.other_side() if with_peer else exchange.peer, exchange.mtls,
    )


def tap_record(o: Outcome) -> TapRecord:
    """What `meshlet tap` shows of a finished request: the authority the client asked for."""
    return TapRecord(o.start, o.direction, o.method, o.authority, o.path, o.route, o.backend, o.code, o.seconds,
                     o.peer_identity, o.request_id)
