"""Builds and runs one sidecar process: a lean mitmproxy Master plus the admin API.

`build_addons` is the one place that decides what runs per request. `DumpMaster` with its
default addons does ~700 req/s here against ~1 200 for the bare set below, so nothing else
goes in unless the sidecar needs it (mTLS plugs in here too).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry

from meshlet.proxy import httpserver
from meshlet.proxy.addon import Routing
from meshlet.proxy.admin import AdminApi
from meshlet.proxy.config import SidecarConfig
from meshlet.proxy.state import Applied, PolicyState
from meshlet.rollout.service import RolloutOptions, make_rollouts, resume_rollouts
from meshlet.telemetry.proxy import ProxyMetrics

log = logging.getLogger("meshlet.proxy")


class StartupError(Exception):
    """The sidecar could not start (a port in use, bad options): one line for the user."""


def build_addons(config: SidecarConfig, routing: Routing) -> list[object]:
    from mitmproxy.addons import core, next_layer, proxyserver, tlsconfig

    from meshlet.proxy.h2c import RefuseH2c
    from meshlet.proxy.mtls import mesh_tls_addons  # before NextLayer/TlsConfig: it supplies mesh TLS itself
    from meshlet.proxy.tunnel import PassThrough

    mtls = mesh_tls_addons(config.identity_dir, lambda: routing.state.table.policies, routing.metrics.registry,
                           config.ca_dir)
    routing.upstream_tls = mtls[0].upstream  # routes with timeout/retries to mesh backends use meshlet's client
    return [
        core.Core(), proxyserver.Proxyserver(), *mtls, RefuseH2c(), PassThrough(), next_layer.NextLayer(),
        tlsconfig.TlsConfig(),
        routing,
    ]


def setup_logging() -> None:
    """Log lines on stderr; mitmproxy's per-connection chatter stays below WARNING."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    logging.getLogger("mitmproxy").setLevel(logging.WARNING)


async def serve(
    config: SidecarConfig, applied: Applied, on_ready: Callable[[dict[str, str]], None],
    rollout: RolloutOptions | None = None,
) -> int:
    """Run until SIGTERM/SIGINT, then stop accepting, drain (bounded) and return 0.

    `rollout` is given to the process that owns the rollouts (not to `--workers` workers).
    """
    from mitmproxy import exceptions, options
    from mitmproxy.master import Master

    from meshlet.proxy.lean import LeanAddons

    registry = CollectorRegistry()
    metrics = ProxyMetrics(registry, config.metrics_compat, config.workload)
    rollouts = None if rollout is None else make_rollouts(rollout, registry, registry)
    if rollouts is not None:
        applied = resume_rollouts(rollouts, applied)
    state = PolicyState(applied, config.identity_dir is not None)
    routing = Routing(state, metrics, config.strict_hosts)
    opts = options.Options()
    master = Master(opts, with_termlog=False)
    master.addons = LeanAddons(master)  # hooks dispatched through an index (meshlet.proxy.lean)
    master.addons.add(*build_addons(config, routing))
    try:
        opts.update(mode=config.mode_specs(), keep_host_header=True, connection_strategy="lazy")
    except exceptions.OptionsError as e:
        raise StartupError(str(e)) from None
    proxyserver = master.addons.get("proxyserver")

    listening = await proxyserver.setup_servers()
    failed = [str(s.last_exception) for s in proxyserver.servers if s.last_exception]
    if not listening or failed:
        raise StartupError("; ".join(failed) or "listeners failed to start")
    mtls = master.addons.get("meshtls")
    admin_api = AdminApi(state, metrics, lambda: all(s.is_running for s in proxyserver.servers),
                         certs=mtls and mtls.certs, rollouts=rollouts)
    try:
        admin = await httpserver.start(admin_api, config.admin.host, config.admin.port)
    except OSError as e:
        await proxyserver.servers.update([])
        raise StartupError(f"admin API cannot listen on {config.admin}: {e.strerror or e}") from None
    await master.running()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_ignore_cancelled_connections)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    addrs = [a for s in proxyserver.servers for a in s.listen_addrs]
    on_ready({
        "outbound": f"{addrs[0][0]}:{addrs[0][1]}", "inbound": f"{addrs[1][0]}:{addrs[1][1]}",
        "admin": f"{config.admin.host}:{httpserver.bound_port(admin)}", "generation": str(state.generation),
    })
    ticker = asyncio.ensure_future(admin_api.run_rollouts()) if rollouts is not None else None
    try:
        await stop.wait()
        await drain(proxyserver, routing, config.drain_timeout)
    finally:
        if ticker is not None:
            ticker.cancel()
        admin.close()
        await master.done()
    return 0


def _ignore_cancelled_connections(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """At exit, Python 3.11's stream callback calls `task.exception()` on connection tasks that
    shutdown cancelled and logs the CancelledError as an error; anything else is still logged."""
    if isinstance(context.get("exception"), asyncio.CancelledError):
        return
    loop.default_exception_handler(context)


async def drain(proxyserver: Any, routing: Routing, timeout: float) -> None:
    """Close the listeners, then wait for requests in flight, at most `timeout` seconds."""
    await proxyserver.servers.update([])
    log.info("draining %d request(s) in flight (up to %gs)", routing.in_flight, timeout)
    deadline = time.monotonic() + timeout
    while routing.in_flight > 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if routing.in_flight > 0:
        log.warning("drain timeout: %d request(s) still in flight", routing.in_flight)
