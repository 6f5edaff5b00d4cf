"""The mitmproxy engine: a lean mitmproxy Master whose addons apply the policy.

`build_addons` is the one place that decides what runs per request. `DumpMaster` with its
default addons does ~700 req/s here against ~1 200 for the bare set below, so nothing else
goes in unless the sidecar needs it (mTLS plugs in here too) or the user asks for it: addon
scripts (`--addon`, meshlet.proxy.mitm.scripts) run after mTLS has authenticated the request
and before routing, so they see the verified identity header, may answer a request themselves,
and their changes to a response are what metrics and tap record.
"""

from __future__ import annotations

import asyncio
import logging
import time
import types
from collections.abc import Sequence
from typing import Any

from meshlet.mtls.files import IdentityError
from meshlet.policy.model import Address
from meshlet.proxy.config import SidecarConfig
from meshlet.proxy.engine import StartupError
from meshlet.proxy.mitm.routing import Routing
from meshlet.proxy.state import PolicyState
from meshlet.proxy.tap import TapHub
from meshlet.telemetry.accesslog import AccessLog
from meshlet.telemetry.outcome import UNKNOWN
from meshlet.telemetry.proxy import ProxyMetrics

log = logging.getLogger("meshlet.proxy")
LARGE_BODY = "8m"  # with addon scripts: bodies above this stream past them (mitmproxy's stream_large_bodies)


def build_addons(config: SidecarConfig, routing: Routing, scripts: Sequence[types.ModuleType] = ()) -> list[object]:
    from mitmproxy.addons import core, next_layer, proxyserver, tlsconfig

    from meshlet.proxy.mitm.forwarding import Forwarding
    from meshlet.proxy.mitm.h2c import H2c
    from meshlet.proxy.mitm.inbound import Inbound  # before mTLS: a refused destination is closed before TLS
    from meshlet.proxy.mitm.mtls import mesh_tls_addons  # before NextLayer/TlsConfig: it supplies mesh TLS itself
    from meshlet.proxy.mitm.strict import Strict  # first of the request hooks: refused requests go no further
    from meshlet.proxy.mitm.tunnel import PassThrough

    mtls = mesh_tls_addons(config, lambda: routing.state.table.policies, routing.metrics.registry,
                           dict(config.workload_labels))
    routing.upstream_tls = mtls[0].upstream  # routes with timeout/retries to mesh backends use meshlet's client
    routing.peer_identity = mtls[0].peer_identity
    routing.server_identity = mtls[0].server_identity
    mtls[0].refused = routing.refused_connection
    return [
        core.Core(), proxyserver.Proxyserver(), Strict(routing.metrics), Inbound(config), *mtls, H2c(routing.metrics),
        PassThrough(routing.metrics), next_layer.NextLayer(), tlsconfig.TlsConfig(), Forwarding(),
        *scripts,
        routing,
    ]


class MitmEngine:
    """mitmproxy's proxy core with meshlet's addons (meshlet.proxy.engine.Engine)."""

    def __init__(self, config: SidecarConfig, state: PolicyState, metrics: ProxyMetrics, tap: TapHub) -> None:
        from mitmproxy import exceptions, options
        from mitmproxy.master import Master

        from meshlet.proxy.mitm.dispatch import LeanAddons
        from meshlet.proxy.mitm.scripts import configure, load_scripts, script_errors

        self.config = config
        from meshlet.proxy.mitm.listeners import install_listeners

        install_listeners(config.reuse_port)
        try:
            self.access_log = AccessLog.open(config.access_log)
        except OSError as e:
            raise StartupError(str(e)) from None
        self.routing = Routing(state, metrics, config.strict_hosts, tap, stream=not config.addons,
                               access_log=self.access_log)
        self.options = options.Options()
        self.master = Master(self.options, with_termlog=False)
        self.master.addons = LeanAddons(self.master)  # hooks dispatched through an index (mitm.dispatch)
        with script_errors(config.addons):
            scripts = load_scripts(config.addons)
        addons = build_addons(config, self.routing, scripts)  # an unusable --identity raises its own error
        with script_errors(config.addons):
            self.master.addons.add(*addons)
            # Without addon scripts nothing reads WebSocket messages: relayed as bytes after the 101,
            # as the lean engine does (and counted as such, routing.tcp_*).
            settings = {"mode": config.mode_specs(), "keep_host_header": True, "connection_strategy": "lazy",
                        "websocket": bool(scripts)}
            if scripts:
                settings["stream_large_bodies"] = LARGE_BODY
            try:
                self.options.update(**settings)
            except exceptions.OptionsError as e:
                raise StartupError(str(e)) from None
            configure(self.master, scripts)
        self.proxyserver: Any = self.master.addons.get("proxyserver")
        self.mtls: Any = self.master.addons.get("meshtls")

    async def start(self) -> tuple[str, str]:
        try:
            await self.mtls.start()  # the first certificate request: a refused token stops the start here
        except IdentityError as e:
            raise StartupError(str(e)) from None
        self.routing.metrics.me.principal = self.mtls.principal() or UNKNOWN
        listening = await self.proxyserver.setup_servers()
        failed = [str(s.last_exception) for s in self.proxyserver.servers if s.last_exception]
        if not listening or failed:
            raise StartupError("; ".join(failed) or "listeners failed to start")
        await self.master.running()
        outbound, inbound = (server.listen_addrs[0] for server in self.proxyserver.servers)  # mode_specs' order
        return str(Address(*outbound[:2])), str(Address(*inbound[:2]))

    def ready(self) -> bool:
        return self.mtls.ready() and all(s.is_running for s in self.proxyserver.servers)

    def certs(self) -> dict:
        return self.mtls.certs()

    async def drain(self, timeout: float) -> None:
        """Close the listeners, then wait for requests in flight, at most `timeout` seconds."""
        await self.proxyserver.servers.update([])
        routing = self.routing
        log.info("draining %d request(s) in flight (up to %gs)", routing.in_flight, timeout)
        deadline = time.monotonic() + timeout
        while routing.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if routing.in_flight > 0:
            log.warning("drain timeout: %d request(s) still in flight", routing.in_flight)

    async def close(self) -> None:
        await self.proxyserver.servers.update([])  # a no-op after drain
        await self.master.done()
        if self.access_log is not None:
            self.access_log.close()
