"""One end of an HTTP/2 connection for the lean engine: the h2 state machine on a transport.

h2 is sans-I/O: bytes in, events out, frames to send. What this adds is the part a proxy needs
on both sides: body data goes out only as the peer's flow-control window and our transport's
write buffer allow, the rest waits per stream (with trailers or the end of the stream queued
behind it), and the owner is told when a stream's backlog has drained, so it can acknowledge the
data it relayed and the sender's window opens again. Windows thus follow what the reading side
consumes, and a slow reader holds at most a window of data here, never the whole stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.exceptions import H2Error
from h2.settings import SettingCodes, Settings
from hyperframe.frame import GoAwayFrame

from meshlet.proxy.lean.http1 import Header

log = logging.getLogger("meshlet.proxy")
WINDOW = 1 << 20  # what we let a peer send per stream before it must wait for our acknowledgements
CONNECTION_WINDOW = 16 << 20  # and on the whole connection (many streams share it)
MAX_CONCURRENT_STREAMS = 1000
MAX_HEADER_LIST = 64 * 1024  # the same bound as HTTP/1.1's header section (meshlet.proxy.lean.http1)


class _Backlog:
    """Body bytes of one stream waiting for window, and what must follow them."""

    __slots__ = ("data", "end", "trailers")

    def __init__(self) -> None:
        self.data = bytearray()
        self.end = False
        self.trailers: list[Header] | None = None


class H2Endpoint(asyncio.Protocol):
    """Subclasses handle the events (`on_events`) and learn of drained streams (`drained`)."""

    def __init__(self, client_side: bool) -> None:
        # Inbound headers are validated (a peer's), outbound ones not again: they are what one of our
        # connections validated on the way in, and h2's checks are a good part of its cost per stream.
        self.conn = H2Connection(H2Configuration(
            client_side=client_side, header_encoding=None, validate_outbound_headers=False,
            normalize_outbound_headers=False,
        ))
        # Our SETTINGS as initial values: assigning to h2's settings object only queues a change (sent
        # by no frame until `update_settings`), while h2 would size its own windows by it at once.
        self.conn.local_settings = Settings(client=client_side, initial_values={
            SettingCodes.INITIAL_WINDOW_SIZE: WINDOW, SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
            SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
        })
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.backlog: dict[int, _Backlog] = {}
        self.write_paused = False
        self.closed = False
        self.flush_due = False

    def start(self) -> None:
        """Our preface and settings, and the connection window."""
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.write_out()

    def write_out(self) -> None:
        """Frames go out once per turn of the loop: everything one read caused, on either side,
        leaves in one write (one syscall) instead of one per frame."""
        if not self.flush_due:
            self.flush_due = True
            asyncio.get_running_loop().call_soon(self.flush_now)

    def flush_now(self) -> None:
        self.flush_due = False
        data = self.conn.data_to_send()
        if data and not self.closed:
            self.transport.write(data)

    def feed(self, data: bytes) -> list:
        """The events in `data`; a protocol error closes the connection (and is logged)."""
        try:
            return self.conn.receive_data(data)
        except H2Error as e:
            log.info("HTTP/2 protocol error from %s: %s", self.transport.get_extra_info("peername"), e)
            try:
                self.conn.close_connection(ErrorCodes.PROTOCOL_ERROR)
                self.flush_now()
            except H2Error:
                pass
            self.transport.close()
            return []

    # --- sending, within the windows -------------------------------------------------------
    def send_headers(self, stream_id: int, headers: list[Header], end: bool = False) -> None:
        try:
            self.conn.send_headers(stream_id, headers, end_stream=end)
        except H2Error as e:  # the stream was reset meanwhile
            log.debug("headers on stream %d dropped: %s", stream_id, e)

    def send_body(self, stream_id: int, data: bytes, end: bool = False) -> None:
        waiting = self.backlog.get(stream_id)
        if waiting is None:
            rest = self._push(stream_id, data, end)
            if rest is None:
                return
            waiting = self.backlog[stream_id] = _Backlog()
            data = rest
        waiting.data += data
        waiting.end = waiting.end or end

    def send_end(self, stream_id: int, trailers: list[Header] | None = None) -> None:
        waiting = self.backlog.get(stream_id)
        if waiting is not None:
            waiting.end = True
            waiting.trailers = trailers
            return
        self._finish_stream(stream_id, trailers)

    def _finish_stream(self, stream_id: int, trailers: list[Header] | None) -> None:
        try:
            if trailers is not None:
                self.conn.send_headers(stream_id, trailers, end_stream=True)
            else:
                self.conn.end_stream(stream_id)
        except H2Error as e:
            log.debug("end of stream %d dropped: %s", stream_id, e)

    def _push(self, stream_id: int, data: bytes, end: bool) -> bytes | None:
        """Send what the windows allow; the unsent rest (None when all went, `end` included)."""
        conn = self.conn
        view = memoryview(data)
        try:
            while view and not self.write_paused:
                size = min(conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size, len(view))
                if size <= 0:
                    break
                conn.send_data(stream_id, bytes(view[:size]), end_stream=end and size == len(view))
                view = view[size:]
            if not view:
                if end and not data:
                    conn.end_stream(stream_id)
                return None
        except H2Error as e:  # reset or closed meanwhile: nothing more will go
            log.debug("data on stream %d dropped: %s", stream_id, e)
            return None
        return bytes(view)

    def flush_backlog(self) -> None:
        """After a WINDOW_UPDATE or a drained transport: send what waited, tell owners what drained."""
        for stream_id, waiting in list(self.backlog.items()):
            rest = self._push(stream_id, bytes(waiting.data), False)
            waiting.data = bytearray(rest or b"")
            if waiting.data:
                continue
            del self.backlog[stream_id]
            if waiting.end:
                self._finish_stream(stream_id, waiting.trailers)
            self.drained(stream_id)
        self.write_out()

    def waiting(self, stream_id: int) -> bool:
        return stream_id in self.backlog

    def forget(self, stream_id: int) -> None:
        self.backlog.pop(stream_id, None)

    def reset(self, stream_id: int, code: int = ErrorCodes.CANCEL) -> None:
        self.backlog.pop(stream_id, None)
        with contextlib.suppress(H2Error):
            self.conn.reset_stream(stream_id, code)

    def acknowledge(self, stream_id: int, size: int) -> None:
        if size:
            with contextlib.suppress(H2Error):
                self.conn.acknowledge_received_data(size, stream_id)

    def goaway(self, last_stream_id: int) -> None:
        """A graceful GOAWAY (NO_ERROR): streams up to `last_stream_id` go on. Written as a raw frame,
        because h2's state machine refuses to send anything after its own `close_connection`."""
        self.flush_now()
        if not self.closed:
            self.transport.write(GoAwayFrame(0, last_stream_id=last_stream_id, error_code=0).serialize())

    def drained(self, stream_id: int) -> None:
        """A stream's backlog went out (all of it)."""

    # --- transport flow control ---------------------------------------------------------------------
    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.flush_backlog()
