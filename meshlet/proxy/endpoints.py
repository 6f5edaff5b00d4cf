"""The sidecar's own HTTP ports, besides the data plane: who can reach each is the point.

- the control API (`--admin`, loopback only): GET/PUT /policy, rollouts, /certs, and the
  health paths too, for local tools and scripts;
- the health port (`--health`, e.g. `[::]:15020` on the Pod IP): /healthz, /readyz, /metrics
  only, read-only, for the kubelet and Prometheus; with `--app-metrics`, its /metrics also
  carries the app's own metrics (meshlet.proxy.appmetrics);
- a `--workers` worker has neither: its private API is a Unix socket (`control`) in the
  supervisor's private directory, reachable only by the sidecar's own user.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from meshlet.proxy import httpserver
from meshlet.proxy.admin import AdminApi, read_only
from meshlet.proxy.appmetrics import AppMetrics, parse_app_metrics
from meshlet.proxy.config import SidecarConfig
from meshlet.proxy.engine import StartupError


@dataclass
class Endpoints:
    """What listens, and the `ready` line's fields (`admin`, `health`) saying where."""

    servers: list[httpserver.Listening | asyncio.Server] = field(default_factory=list)
    addresses: dict[str, str] = field(default_factory=dict)

    def close(self) -> None:
        for server in self.servers:
            server.close()


async def start_endpoints(api: AdminApi, config: SidecarConfig) -> Endpoints:
    """Start the control API (or a worker's Unix socket) and the health port; StartupError names the port."""
    endpoints = Endpoints()
    try:
        if config.control is not None:
            endpoints.servers.append(await _listen(httpserver.start_unix(api, config.control), config.control))
            endpoints.addresses["admin"] = config.control
            return endpoints
        admin = await _listen(httpserver.start(api, config.admin.host, config.admin.port), config.admin)
        endpoints.servers.append(admin)
        endpoints.addresses["admin"] = _where(config.admin.host, admin)
        if config.health is not None:
            health = await _listen(httpserver.start(_health(api, config), config.health.host, config.health.port),
                                   config.health, "health port")
            endpoints.servers.append(health)
            endpoints.addresses["health"] = _where(config.health.host, health)
    except BaseException:
        endpoints.close()
        raise
    return endpoints


def _health(api: AdminApi, config: SidecarConfig) -> httpserver.Handler:
    if config.app_metrics is None:
        return read_only(api)
    return read_only(api, AppMetrics(parse_app_metrics(config.app_metrics), api.render_metrics).handle)


async def _listen(starting, where: object, what: str = "admin API"):
    try:
        return await starting
    except OSError as e:
        raise StartupError(f"{what} cannot listen on {where}: {e.strerror or e}") from None


def _where(host: str, server: httpserver.Listening) -> str:
    port = httpserver.bound_port(server)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
