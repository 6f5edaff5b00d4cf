"""The mTLS addon: mesh identity on both sides of the sidecar.

Inbound (the reverse-mode listener): applies the policy's `mtls.mode` — STRICT refuses plaintext and any TLS
peer without a mesh certificate at the handshake, PERMISSIVE sniffs the first bytes and takes
both, DISABLE takes plaintext only — then authorizes each request by the peer's SPIFFE ID (403
when not in `mtls.allow`) and hands the verified ID to the app in `x-meshlet-peer-identity`,
after deleting whatever the client put there.

Outbound: a request routed to a `tls: mesh` backend goes out over mTLS with this workload's
certificate; the peer must chain to the mesh CA and, when the backend names an `identity`,
present exactly that SPIFFE ID.

mitmproxy's own tlsconfig cannot do either (it accepts any client certificate and forces hostname
checks upstream), so this addon supplies the `SSL.Connection`s itself and must be added before
`NextLayer` and `TlsConfig` (both step aside when a layer or connection is already set). The
routing addon marks mesh backends `https`; this addon recognises them by address in
`tls_start_server`. Everything it decides comes from pure functions in `meshlet.mtls`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from mitmproxy import connection, ctx, http, tls
from mitmproxy.addons.tlsconfig import AppData, alpn_select_callback
from mitmproxy.net.tls import starts_like_tls_record
from mitmproxy.proxy import layer, server_hooks
from OpenSSL import SSL, crypto
from prometheus_client import CollectorRegistry

from meshlet.mtls.contexts import TlsContexts
from meshlet.mtls.inbound import NO_LABELS, PEER_IDENTITY_HEADER, Labels, inbound_mtls, mesh_backends
from meshlet.mtls.source import POLL_SECONDS, IdentityConfig, IdentitySource, identity_source
from meshlet.mtls.upstream import UpstreamTls, client_context
from meshlet.mtls.verify import Result, Verdict, identity_of, verify_peer
from meshlet.policy.model import Backend, TrafficPolicy
from meshlet.proxy.mitm.exchange import REFUSED
from meshlet.proxy.mitm.inbound import Refuse, is_inbound
from meshlet.telemetry.mtls import MtlsMetrics, default_metrics

log = logging.getLogger(__name__)

MAX_RESUMABLE_PEERS = 1024  # outbound sessions kept for resumption; forgotten all at once past that


@dataclass
class _Probe:
    """The verify callback of one handshake, remembering its verdict for metrics and authorization."""

    bundle: Sequence
    now: Callable[[], dt.datetime]
    expect: tuple[str, ...] = ()
    verdict: Verdict | None = None

    above: list = field(default_factory=list)  # the chain's certificates above the leaf, as OpenSSL walks down

    def callback(self, _conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int) -> bool:
        if depth > 0:
            self.above.insert(0, cert)
            return True  # the chain is judged as a whole at the leaf, by verify_peer
        try:
            chain = [cert.to_cryptography(), *(c.to_cryptography() for c in self.above)]
            verdict = verify_peer(chain, self.bundle, self.now(), self.expect)
        except ValueError as e:  # an extension cryptography cannot parse: not a certificate we issued
            verdict = Verdict("bad_ca", detail=f"unreadable certificate: {e}")
        if verdict.ok and not ok:  # OpenSSL found a fault verify_peer does not model: trust the stricter
            verdict = Verdict("bad_ca", verdict.identity, detail=f"OpenSSL verify error {errno}")
        self.verdict = verdict
        return verdict.ok


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class MeshTls:
    """One per sidecar process. `policies` returns the running policies (read, never stored, per
    connection or request, so a PUT /policy applies to the next handshake); `source` is None
    when the sidecar runs without an identity, and holds no contexts until its first certificate:
    meanwhile TLS is refused inbound and not originated. `refused` is told of every inbound
    connection refused at the handshake (or for plaintext), which metrics count as a 403."""

    def __init__(
        self,
        source: IdentitySource | None,
        policies: Callable[[], Sequence[TrafficPolicy]],
        metrics: MtlsMetrics | None = None,
        poll_interval: float = POLL_SECONDS,
        now: Callable[[], dt.datetime] = _now,
        workload_labels: Labels = NO_LABELS,
    ) -> None:
        self.source = source
        self._labels = workload_labels  # which policy's mtls section is this workload's (mtls.selector)
        self._policies = policies
        self.metrics = metrics or default_metrics()
        self._poll_interval = poll_interval
        self._now = now
        self._probes: dict[str, _Probe] = {}  # connection id → handshake in progress
        self._peers: dict[str, tuple] = {}  # outbound connection id → its resumption key
        self._identities: dict[str, str] = {}  # inbound client id → verified SPIFFE ID
        self._servers: dict[str, str] = {}  # outbound server id → the SPIFFE ID it proved
        self.refused: Callable[[], None] = lambda: None
        self._resume: dict[tuple, SSL.Connection] = {}  # outbound: last connection per peer, for its session
        self._seen: Sequence[TrafficPolicy] | None = None
        self._mesh: dict[tuple[str, int], Backend] = {}
        self._poller: asyncio.Task | None = None
        self._upstream_context: tuple[str, ssl.SSLContext] | None = None  # (our serial, context)
        self._expiry()

    # --- lifecycle: follow the identity source ---------------------------------------------
    async def start(self) -> None:
        """The engine calls this before serving: the first certificate request (IdentityError
        when refused for good), then the poll loop that swaps in rotations."""
        if self.source is None or self._poller is not None:
            return
        await self.source.start()
        self._expiry()
        self._poller = asyncio.get_running_loop().create_task(self._poll_forever())

    def done(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            self._poller = None
        if self.source is not None:
            self.source.close()

    async def _poll_forever(self) -> None:
        assert self.source is not None
        while True:
            await asyncio.sleep(self._poll_interval)
            if self.source.poll():
                self._expiry()

    def _expiry(self) -> None:
        contexts = self._contexts()
        if contexts is not None:
            self.metrics.cert_expiry.set(contexts.identity.not_after.timestamp())

    def _contexts(self) -> TlsContexts | None:
        return None if self.source is None else self.source.current

    def ready(self) -> bool:
        """Without an identity there is nothing to wait for; with one, a certificate must be held."""
        return self.source is None or self.source.ready()

    def principal(self) -> str:
        """This workload's SPIFFE ID ("" without an identity yet)."""
        contexts = self._contexts()
        return "" if contexts is None else contexts.identity.spiffe_id

    def certs(self) -> dict:
        """What `GET /certs` on the admin API shows."""
        return {"identity": None} if self.source is None else self.source.describe()

    # --- inbound -----------------------------------------------------------------------------
    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        client = nextlayer.context.client
        if nextlayer.layer or not is_inbound(client):
            return
        data = nextlayer.data_client()
        if not data:
            return
        is_tls = starts_like_tls_record(data)
        mode = inbound_mtls(self._policies(), self._labels).mode
        if not is_tls:
            self.metrics.handshake("inbound", "plaintext")
        no_identity = self._contexts() is None
        if (mode == "STRICT" and not is_tls) or (mode == "DISABLE" and is_tls) or (is_tls and no_identity):
            log.info("inbound %s refused: %s on a %s port", client.peername, "TLS" if is_tls else "plaintext", mode)
            nextlayer.layer = Refuse(nextlayer.context)
            self.refused()

    def tls_start_client(self, data: tls.TlsData) -> None:
        client = data.context.client
        contexts = self._contexts()
        if data.ssl_conn is not None or contexts is None or not is_inbound(client):
            return
        probe = _Probe(contexts.identity.bundle, self._now)
        conn = SSL.Connection(contexts.server)
        conn.set_app_data(AppData(client_alpn=client.alpn, server_alpn=data.context.server.alpn,
                                  http2=ctx.options.http2))
        conn.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, probe.callback)
        conn.set_accept_state()
        self._probes[client.id] = probe
        data.ssl_conn = conn

    def tls_established_client(self, data: tls.TlsData) -> None:
        probe = self._probes.pop(data.conn.id, None)
        if probe is None:
            return
        if probe.verdict is None and data.ssl_conn is not None:  # resumed: no certificate was exchanged
            probe.verdict = _resumed_verdict(probe, data.ssl_conn)
            if not probe.verdict.ok:  # e.g. the remembered certificate expired since: no identity, STRICT answers 403
                self._failed("inbound", probe, data.conn)
                return
            self.metrics.resumed.labels("inbound").inc()
        if probe.verdict is None or probe.verdict.identity is None:
            return
        identity = probe.verdict.identity
        self._identities[data.conn.id] = identity
        allow = inbound_mtls(self._policies(), self._labels).allow
        self.metrics.handshake("inbound", "denied" if allow and identity not in allow else "ok")

    def tls_failed_client(self, data: tls.TlsData) -> None:
        probe = self._probes.pop(data.conn.id, None)
        if probe is not None:
            self._failed("inbound", probe, data.conn)
            self.refused()

    def peer_identity(self, client: connection.Client) -> str:
        """The SPIFFE ID verified on this inbound connection ("" for none): what `meshlet tap` shows."""
        return self._identities.get(client.id, "")

    def client_disconnected(self, client: connection.Client) -> None:
        self._identities.pop(client.id, None)
        self._probes.pop(client.id, None)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error:
            return
        if is_inbound(flow.client_conn):
            self._authorize(flow)

    def _authorize(self, flow: http.HTTPFlow) -> None:
        flow.request.headers.pop(PEER_IDENTITY_HEADER, None)
        mtls = inbound_mtls(self._policies(), self._labels)
        identity = self._identities.get(flow.client_conn.id)
        if identity is None:
            if mtls.mode == "STRICT":  # a plaintext connection accepted before the policy became STRICT
                _forbid(flow, "mTLS required")
            return
        if mtls.allow and identity not in mtls.allow:
            _forbid(flow, f"peer identity {identity} is not allowed")
            return
        flow.request.headers[PEER_IDENTITY_HEADER] = identity

    # --- outbound: the routing addon sets scheme https for `tls: mesh` backends ------------------
    def tls_start_server(self, data: tls.TlsData) -> None:
        server = data.conn
        if data.ssl_conn is not None or server.address is None:
            return
        backend = self._mesh_backend(*server.address[:2])
        if backend is None:
            return
        contexts = self._contexts()
        if contexts is None:  # mitmproxy's own TLS follows, and fails: the mesh CA is in no public bundle
            log.warning("backend %s (%s) needs mesh mTLS but the sidecar holds no workload certificate",
                        backend.name, backend.address)
            return
        probe = _Probe(contexts.identity.bundle, self._now, (backend.identity,) if backend.identity else ())
        conn = SSL.Connection(contexts.client)
        conn.set_verify(SSL.VERIFY_PEER, probe.callback)
        if server.alpn_offers:
            conn.set_alpn_protos(list(server.alpn_offers))
        peer = _resume_key(server.address, probe.expect, contexts)
        previous = self._resume.get(peer)
        if previous is not None:  # resume the session a verified connection to this peer got
            with contextlib.suppress(SSL.Error):
                conn.set_session(previous.get_session())
        conn.set_connect_state()
        self._probes[server.id] = probe
        self._peers[server.id] = peer
        data.ssl_conn = conn

    def tls_established_server(self, data: tls.TlsData) -> None:
        probe = self._probes.pop(data.conn.id, None)
        if probe is not None:
            self.metrics.handshake("outbound", "ok")
            if probe.verdict is None:  # resumed: the peer was verified when the session began
                self.metrics.resumed.labels("outbound").inc()
            self._servers[data.conn.id] = _proven_identity(probe, data.ssl_conn)
            peer = self._peers.pop(data.conn.id, None)
            if peer is not None and data.ssl_conn is not None:
                if len(self._resume) >= MAX_RESUMABLE_PEERS:
                    self._resume.clear()
                # Its session (a TLS 1.3 ticket arrives just after the handshake) is read when the next one starts.
                self._resume[peer] = data.ssl_conn

    def tls_failed_server(self, data: tls.TlsData) -> None:
        peer = self._peers.pop(data.conn.id, None)
        if peer is not None:
            self._resume.pop(peer, None)  # a refused peer (or a stale session) starts over with a full handshake
        probe = self._probes.pop(data.conn.id, None)
        if probe is not None:
            self._failed("outbound", probe, data.conn)

    def server_identity(self, server: connection.Server) -> str:
        """The SPIFFE ID a mesh backend proved on this connection ("" for none): whose metadata to believe."""
        return self._servers.get(server.id, "")

    def server_disconnected(self, data: server_hooks.ServerConnectionHookData) -> None:
        self._servers.pop(data.server.id, None)
        self._probes.pop(data.server.id, None)
        self._peers.pop(data.server.id, None)

    def upstream(self, backend: Backend) -> UpstreamTls | None:
        """mTLS for meshlet's own upstream client (routes with timeout/retries); None without an identity."""
        contexts = self._contexts()
        if contexts is None:
            return None
        identity = contexts.identity
        if self._upstream_context is None or self._upstream_context[0] != identity.serial:
            self._upstream_context = (identity.serial, client_context(identity))
        return UpstreamTls(self._upstream_context[1], identity.serial, backend.identity or None, self._upstream_result)

    def _upstream_result(self, result: Result) -> None:
        self.metrics.handshake("outbound", result)

    def _mesh_backend(self, host: str, port: int) -> Backend | None:
        policies = self._policies()
        if policies is not self._seen:  # a new policy was swapped in: recompile the lookup once
            self._mesh, self._seen = mesh_backends(policies), policies
        return self._mesh.get((host, port))

    def _failed(self, direction: str, probe: _Probe, conn: connection.Connection) -> None:
        verdict = probe.verdict
        result = verdict.result if verdict is not None and not verdict.ok else "no_cert"
        self.metrics.handshake(direction, result)
        log.info("%s mTLS handshake with %s refused: %s %s", direction, conn.peername or conn.address, result,
                 verdict.detail if verdict else conn.error or "")


def _resume_key(address: tuple, expect: tuple[str, ...], contexts: TlsContexts) -> tuple:
    """Sessions are resumed only with the same peer, the same required identity and our same certificate."""
    return (tuple(address[:2]), expect, contexts.identity.serial)


def _resumed_verdict(probe: _Probe, conn: SSL.Connection) -> Verdict:
    """The verdict on a resumed session's peer: its remembered certificate, judged again now."""
    cert = conn.get_peer_certificate()
    if cert is None:
        return Verdict("no_cert", detail="resumed session without a peer certificate")
    return verify_peer([cert.to_cryptography()], probe.bundle, probe.now(), probe.expect)


def _proven_identity(probe: _Probe, conn: SSL.Connection | None) -> str:
    """The verified peer's SPIFFE ID; on a resumed session, the one its remembered certificate names."""
    if probe.verdict is not None:
        return probe.verdict.identity or ""
    cert = conn.get_peer_certificate() if conn is not None else None
    return (identity_of(cert.to_cryptography()) or "") if cert is not None else ""


def _forbid(flow: http.HTTPFlow, reason: str) -> None:
    flow.response = http.Response.make(403, f"meshlet: {reason}\n", {"content-type": "text/plain"})
    flow.metadata[REFUSED] = True  # counted as an authorization refusal (UAEX)


def mesh_tls_addons(config: IdentityConfig, policies: Callable[[], Sequence[TrafficPolicy]],
                    registry: CollectorRegistry, workload_labels: Labels = NO_LABELS) -> list[MeshTls]:
    """The addon as the sidecar adds it, with the identity source `config` names
    (meshlet.mtls.source); raises IdentityError when its files are unusable.

    Present even without an identity: STRICT must still refuse plaintext, and the identity
    header must still be stripped.
    """
    source = identity_source(config, alpn_select=alpn_select_callback)  # ALPN negotiated as mitmproxy does
    return [MeshTls(source, policies, MtlsMetrics(registry), workload_labels=workload_labels)]
