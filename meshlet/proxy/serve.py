"""One sidecar process, whichever engine serves requests: state, metrics, rollouts, admin API,
signals and drain. `meshlet run --workers 1` runs this; each `--workers` worker runs it too,
with its admin API on a private Unix socket that only the supervisor uses (meshlet.proxy.endpoints).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry

from meshlet.proxy.admin import AdminApi
from meshlet.proxy.config import SidecarConfig
from meshlet.proxy.endpoints import start_endpoints
from meshlet.proxy.engine import StartupError, make_engine
from meshlet.proxy.state import Applied, PolicyState
from meshlet.proxy.tap import TapHub, hub_lines
from meshlet.rollout.service import RolloutOptions, make_rollouts, resume_rollouts
from meshlet.telemetry.proxy import ProxyMetrics

log = logging.getLogger("meshlet.proxy")

__all__ = ["StartupError", "run_serve", "serve", "setup_logging"]


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
    registry = CollectorRegistry()
    metrics = ProxyMetrics(registry, config.metrics_compat, config.mesh_workload())
    rollouts = None if rollout is None else make_rollouts(rollout, registry, registry)
    if rollouts is not None:
        applied = resume_rollouts(rollouts, applied)
    state = PolicyState(applied, config.has_identity, dict(config.workload_labels))
    tap = TapHub()
    engine = make_engine(config, state, metrics, tap)
    outbound, inbound = await engine.start()
    admin_api = AdminApi(state, metrics, engine.ready, certs=engine.certs, rollouts=rollouts,
                         tap=lambda: hub_lines(tap), internal=config.control is not None)
    try:
        endpoints = await start_endpoints(admin_api, config)
    except StartupError:
        await engine.close()
        raise

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_ignore_cancelled_connections)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    on_ready({
        "outbound": outbound, "inbound": inbound, **endpoints.addresses,
        "generation": str(state.generation), "engine": config.engine,
    })
    ticker = asyncio.ensure_future(admin_api.run_rollouts()) if rollouts is not None else None
    try:
        await stop.wait()
        await engine.drain(config.drain_timeout)
    finally:
        if ticker is not None:
            ticker.cancel()
        tap.close()  # `meshlet tap` clients see their stream end
        endpoints.close()
        await engine.close()
    return 0


def _ignore_cancelled_connections(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """At exit, Python 3.11's stream callback calls `task.exception()` on connection tasks that
    shutdown cancelled and logs the CancelledError as an error; anything else is still logged."""
    if isinstance(context.get("exception"), asyncio.CancelledError):
        return
    loop.default_exception_handler(context)


def run_serve(
    config: SidecarConfig, applied: Applied, on_ready: Callable[[dict[str, str]], None],
    rollout: RolloutOptions | None = None,
) -> int:
    """`serve` on the engine's event loop: uvloop for the lean engine (its transports and
    timers are C, a third of a request's CPU on the stdlib loop), asyncio's own for mitmproxy."""
    coroutine = serve(config, applied, on_ready, rollout)
    if config.engine == "lean":
        import uvloop

        return uvloop.run(coroutine)
    return asyncio.run(coroutine)
