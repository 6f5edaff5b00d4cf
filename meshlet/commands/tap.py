"""`meshlet tap --sidecar URL [--save FILE]`: a sidecar's requests, live, one line each."""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import signal
import socket
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from meshlet.commands import CommandError
from meshlet.proxy.tap import Lost, TapRecord, decode

if TYPE_CHECKING:
    from meshlet.proxy.mitm.flowfile import FlowFile

CONNECT_TIMEOUT = 5.0
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


class Stopped(Exception):
    """Ctrl-C or SIGTERM: stop reading, keep what was saved."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tap",
        help="stream a sidecar's live requests, one line each (optionally into a mitmproxy flow file)",
        description="Print every request the sidecar finishes (all its workers): time, direction, status, "
                    "latency, method, authority and path, route, backend, peer identity, request id. "
                    "Costs the sidecar nothing while no tap is attached. Ctrl-C stops.",
        epilog="example: meshlet tap --save requests.mitm   (then: mitmproxy -r requests.mitm)",
    )
    parser.add_argument("--sidecar", default="http://127.0.0.1:15000", metavar="URL", help="admin API base URL")
    parser.add_argument("--save", type=Path, metavar="FILE",
                        help="also write the requests as a mitmproxy flow file (`mitmproxy -r FILE` opens it); "
                             "request lines and statuses only, no bodies")
    parser.set_defaults(handler=run)


def render(record: TapRecord) -> str:
    clock = time.strftime("%H:%M:%S", time.localtime(record.start)) + f".{int(record.start * 1000) % 1000:03d}"
    status = str(record.status) if record.status else "---"
    took = f"{record.seconds * 1e3:.1f}ms"
    line = (f"{clock} {record.direction:<8} {status} {took:>8} {record.method} {record.authority}{record.path}"
            f"  route={record.route} backend={record.backend}")
    if record.peer_identity:
        line += f" peer={record.peer_identity}"
    if record.request_id:
        line += f" id={record.request_id}"
    return line


def _connect(base: str) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    url = base.rstrip("/") + "/tap"
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise CommandError(f"--sidecar {base}: expected http://HOST:PORT (the admin API)")
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80)
    try:
        conn.sock = sock = socket.create_connection((parts.hostname, parts.port or 80), CONNECT_TIMEOUT)
        conn.request("GET", parts.path)
        response = conn.getresponse()
    except (OSError, http.client.HTTPException) as e:
        conn.close()
        raise CommandError(f"sidecar unreachable at {url}: {e}") from None
    if response.status != 200:
        conn.close()
        raise CommandError(f"GET {url}: HTTP {response.status} (is this a meshlet admin API with tap?)")
    sock.settimeout(None)  # the stream (which now owns the socket) may stay quiet for hours
    return conn, response


def _lines(response: http.client.HTTPResponse) -> Iterator[bytes]:
    """Until the sidecar ends the stream (it stopped) or the connection drops."""
    with contextlib.suppress(OSError, http.client.HTTPException):
        while line := response.readline():
            yield line


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until a flow is written whole."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def _stop(signum: int, frame: object) -> None:
    raise Stopped


def run(args: argparse.Namespace) -> int:
    conn, response = _connect(args.sidecar)
    with contextlib.ExitStack() as stack:
        stack.callback(conn.close)
        saved: FlowFile | None = None
        if args.save is not None:
            from meshlet.proxy.mitm.flowfile import FlowFile

            try:
                saved = FlowFile(stack.enter_context(open(args.save, "wb")))
            except OSError as e:
                raise CommandError(f"--save {args.save}: {e.strerror}") from None
        for sig in STOP_SIGNALS:
            signal.signal(sig, _stop)
        try:
            for line in _lines(response):
                follow(line, saved)
        except Stopped:
            return 0
        except BrokenPipeError:  # `meshlet tap | head`: the reader has seen enough
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        print("meshlet tap: the sidecar ended the stream", file=sys.stderr)
    return 0


def follow(line: bytes, saved: FlowFile | None) -> None:
    """One line of the stream: printed, and saved when asked."""
    try:
        item = decode(line)
    except ValueError:
        print(f"meshlet tap: skipped a line that is not a tap record: {line[:80]!r}", file=sys.stderr)
        return
    if isinstance(item, Lost):
        print(f"meshlet tap: {item.count} request(s) not shown: this tap read too slowly", file=sys.stderr)
        return
    print(render(item), flush=True)
    if saved is not None:
        with _signals_held():
            saved.add(item)
