"""The lean engine: listeners, the connections they accept, and their lifecycle.

Outbound (the app's calls, on loopback) is uvloop's own server: every connection is HTTP/1 or
relayed by its first bytes. Inbound is accepted here and peeked at (MSG_PEEK) before a transport
exists, because the first byte decides the transport: TLS (0x16) gets the mesh server context
and a handshake, plaintext gets none, and the policy's mTLS mode refuses either before any byte
is answered. A once-a-second sweep enforces the header-read and idle timeouts without a timer
per request. SIGTERM drains: listeners close, idle keep-alive connections close, responses in
flight carry `Connection: close`.

What refusals and relays tell telemetry passes through here (`refused`, `relay_closed`): metrics,
and the access log when `--access-log` opened one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from meshlet.mtls.inbound import inbound_mtls
from meshlet.policy.model import Address, Backend
from meshlet.proxy import peermeta
from meshlet.proxy.config import SidecarConfig
from meshlet.proxy.engine import StartupError
from meshlet.proxy.inbound import INBOUND_ROUTE, REFUSED_BACKEND
from meshlet.proxy.lean.downstream import Downstream
from meshlet.proxy.lean.upstream import UpstreamPool
from meshlet.proxy.listen import bind_listeners, is_loopback
from meshlet.proxy.state import PolicyState
from meshlet.proxy.tap import TapHub
from meshlet.telemetry.accesslog import AccessLog
from meshlet.telemetry.mtls import MtlsMetrics
from meshlet.telemetry.outcome import NO_FLAGS, UNAUTHORIZED, UNKNOWN, Outcome, Workload
from meshlet.telemetry.proxy import ProxyMetrics

if TYPE_CHECKING:  # mTLS parts load only with --identity: cryptography is ~15 MiB of a worker's RSS
    from meshlet.mtls.upstream import UpstreamTls
    from meshlet.proxy.lean.tls import LeanIdentity

log = logging.getLogger("meshlet.proxy")
SWEEP_SECONDS = 1.0
TLS_RECORD = 0x16
BACKLOG = 1024


class LeanEngine:
    """meshlet's own HTTP/1.1 data plane (meshlet.proxy.engine.Engine)."""

    def __init__(self, config: SidecarConfig, state: PolicyState, metrics: ProxyMetrics, tap: TapHub) -> None:
        self.config = config
        self.state = state
        self.metrics = metrics
        self.tap = tap
        self.mtls_metrics = MtlsMetrics(metrics.registry)
        self.identity: LeanIdentity | None = None
        if config.has_identity:
            from meshlet.mtls.source import identity_source
            from meshlet.proxy.lean.tls import LeanIdentity

            source = identity_source(config)  # IdentityError: the CLI says it in one line
            if source is not None:
                self.identity = LeanIdentity(source, self.mtls_metrics, metrics.me)
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.pool: UpstreamPool = None  # type: ignore[assignment]
        self.connections: set[Downstream] = set()
        self.relays: set[asyncio.Transport] = set()
        self.tasks: set[asyncio.Task] = set()
        self.sniffing: dict[socket.socket, asyncio.TimerHandle] = {}
        self.draining = False
        self.listening = False
        self.own_ports: frozenset[int] = frozenset()
        self._outbound: list[asyncio.Server] = []
        self._inbound: list[socket.socket] = []
        self.workload_labels = dict(config.workload_labels)
        self._sweeper: asyncio.Task | None = None
        self.access_log: AccessLog | None = None
        self.labels_peers = metrics.istio is not None  # only Istio's labels name the other side of a hop
        self._metadata: dict[str, bytes] = {}  # service -> this workload's peer metadata naming it
        self._declared: dict[int, tuple[Backend, Workload]] = {}  # of the table in `_declared_table`
        self._declared_table: object = None

    # --- Engine ------------------------------------------------------------------------------
    def _bind(self, address: Address) -> list[socket.socket]:
        """SO_REUSEADDR (a restarted sidecar binds at once), SO_REUSEPORT for `--workers`, `::` as
        one dual-stack socket, `localhost` as both loopbacks: meshlet.proxy.listen, as mitmproxy's."""
        try:
            return bind_listeners(address, self.config.reuse_port)
        except OSError as e:
            raise StartupError(f"cannot listen on {address}: {e.strerror or e}") from None

    async def start(self) -> tuple[str, str]:
        self.loop = asyncio.get_running_loop()
        try:
            self.access_log = AccessLog.open(self.config.access_log)
        except OSError as e:
            raise StartupError(str(e)) from None
        if self.identity is not None:
            from meshlet.mtls.errors import IdentityError

            try:
                await self.identity.start()
            except IdentityError as e:
                raise StartupError(str(e)) from None
        self.pool = UpstreamPool()
        config = self.config
        outbound = self._bind(config.outbound)
        try:
            inbound = self._bind(config.inbound)
        except StartupError:
            for sock in outbound:
                sock.close()
            raise
        self._outbound = [
            await self.loop.create_server(lambda: Downstream(self, "outbound"), sock=sock, backlog=BACKLOG)
            for sock in outbound
        ]
        for sock in inbound:
            sock.listen(BACKLOG)
            self.loop.add_reader(sock.fileno(), self._accept_inbound, sock)
        self._inbound = inbound
        self.own_ports = config.own_ports | {outbound[0].getsockname()[1], inbound[0].getsockname()[1]}
        self._sweeper = self.loop.create_task(self._sweep())
        self.listening = True
        return _describe(outbound[0]), _describe(inbound[0])

    def ready(self) -> bool:
        return self.listening and (self.identity is None or self.identity.ready())

    def certs(self) -> dict:
        return self.identity.certs() if self.identity is not None else {"identity": None}

    async def drain(self, timeout: float) -> None:
        self._stop_listening()
        self.draining = True
        for downstream in list(self.connections):
            downstream.drain()
        busy = sum(1 for d in self.connections if d.active is not None)
        log.info("draining %d request(s) in flight (up to %gs)", busy, timeout)
        deadline = time.monotonic() + timeout
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        busy = sum(1 for d in self.connections if d.active is not None)
        if busy:
            log.warning("drain timeout: %d request(s) still in flight", busy)

    async def close(self) -> None:
        self._stop_listening()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self.identity is not None:
            self.identity.stop()
        for downstream in list(self.connections):
            downstream.transport.abort()
        for transport in list(self.relays):
            transport.abort()
        for task in list(self.tasks):
            task.cancel()
        if self.pool is not None:
            self.pool.close()
        await asyncio.sleep(0)  # let the transports' connection_lost callbacks run
        if self.access_log is not None:
            self.access_log.close()
            self.access_log = None

    # --- what exchanges ask -------------------------------------------------------------------
    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task:
        task = self.loop.create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def upstream_tls(self, backend: Backend, h2: bool = False) -> UpstreamTls | None:
        return self.identity.upstream(backend, h2) if self.identity is not None else None

    def inbound_allow(self) -> tuple[str, ...]:
        return inbound_mtls(self.state.table.policies, self.workload_labels).allow

    def is_own_address(self, destination: tuple[str, int]) -> bool:
        """A passthrough back into this sidecar would loop."""
        return destination[1] in self.own_ports and is_loopback(destination[0])

    # --- what refusals and relays tell telemetry (requests: Request.finish) -----------------------
    def refused(self) -> None:
        """An inbound connection refused before any request could be read (the mTLS mode, a failed
        handshake, a certificate without a mesh identity): one 403 UAEX, as a refused request."""
        outcome = Outcome("inbound", INBOUND_ROUTE, REFUSED_BACKEND, UNKNOWN, 403, UNAUTHORIZED, start=time.time())
        self.metrics.observe(outcome)
        if self.access_log is not None:
            self.access_log.write(outcome)

    def relay_closed(self, direction: str, service: str = UNKNOWN, peer: Workload | None = None,
                     mtls: bool = False) -> Callable[..., None]:
        """What an L4 relay calls with its bytes each way (from the client, to it) once closed, or with
        0, 0 and a response flag when it never opened: istio_tcp_*."""
        tcp = self.metrics.tcp

        def closed(received: int, sent: int, flags: str = NO_FLAGS) -> None:
            tcp(direction, service, peer, mtls, sent, received, flags)

        return closed

    def declared(self, backend: Backend) -> Workload:
        """What a policy backend declares it is (meshlet.proxy.peermeta.declared), built once per
        backend of the running table: the peer of a hop that brought no metadata."""
        table = self.state.table
        if table is not self._declared_table:
            self._declared_table, self._declared = table, {}
        known = self._declared.get(id(backend))
        if known is None or known[0] is not backend:
            known = self._declared[id(backend)] = (backend, peermeta.declared(backend))
        return known[1]

    def metadata_value(self, service: str = "") -> bytes:
        """This workload's x-meshlet-peer-metadata (naming the `service` a request was routed by)."""
        value = self._metadata.get(service)
        if value is None:
            value = self._metadata[service] = peermeta.encode(self.metrics.me, service)
        return value

    def metadata_line(self, service: str = "") -> bytes:
        return b"%s: %s\r\n" % (peermeta.HEADER, self.metadata_value(service))

    # --- inbound: accept, peek, then the transport the first byte asks for ----------------------
    def _accept_inbound(self, listener: socket.socket) -> None:
        for _ in range(BACKLOG):
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and the like: logged, the listener stays
                log.warning("inbound accept failed: %s", e)
                return
            sock.setblocking(False)
            self.loop.add_reader(sock.fileno(), self._sniff, sock)
            self.sniffing[sock] = self.loop.call_later(self.config.header_timeout, self._sniff_timed_out, sock)

    def _sniff(self, sock: socket.socket) -> None:
        try:
            first = sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            first = b""
        self._unsniff(sock)
        if not first:
            sock.close()
            return
        is_tls = first[0] == TLS_RECORD
        mode = inbound_mtls(self.state.table.policies, self.workload_labels).mode
        if not is_tls:
            self.mtls_metrics.handshake("inbound", "plaintext")
        no_certificate = self.identity is None or self.identity.server is None
        if (mode == "STRICT" and not is_tls) or (mode == "DISABLE" and is_tls) or (is_tls and no_certificate):
            log.info("inbound connection refused: %s on a %s port", "TLS" if is_tls else "plaintext", mode)
            _close_quietly(sock)
            self.refused()
            return
        factory = lambda: Downstream(self, "inbound")  # noqa: E731
        if is_tls:
            self.spawn(self._tls(sock, factory))
        else:
            self.spawn(self._plain(sock, factory))

    async def _tls(self, sock: socket.socket, factory) -> None:
        assert self.identity is not None
        if not await self.identity.accept(sock, factory, self.config.header_timeout):
            self.refused()

    async def _plain(self, sock: socket.socket, factory) -> None:
        try:
            await self.loop.connect_accepted_socket(factory, sock)
        except OSError:
            sock.close()

    def _sniff_timed_out(self, sock: socket.socket) -> None:
        self._unsniff(sock)
        sock.close()

    def _unsniff(self, sock: socket.socket) -> None:
        timer = self.sniffing.pop(sock, None)
        if timer is not None:
            timer.cancel()
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(sock.fileno())

    # --- housekeeping --------------------------------------------------------------------------
    def _stop_listening(self) -> None:
        self.listening = False
        for server in self._outbound:
            server.close()
        self._outbound = []
        for listener in self._inbound:
            self.loop.remove_reader(listener.fileno())
            listener.close()
        self._inbound = []
        for sock in list(self.sniffing):
            self._unsniff(sock)
            sock.close()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            now = self.loop.time()
            for downstream in list(self.connections):
                downstream.sweep(now)
            self.pool.sweep(now)


def _close_quietly(sock: socket.socket) -> None:
    """Close without a byte of answer and without a reset: what the peer sent is read first (closing
    with unread data makes the kernel send RST, which clients report as an error of their own)."""
    with contextlib.suppress(OSError):
        while sock.recv(65536):
            pass
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def _describe(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
