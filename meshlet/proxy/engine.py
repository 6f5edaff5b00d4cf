"""What the shared sidecar process (meshlet.proxy.serve) needs from a data-plane engine.

Two engines implement it: `lean` (meshlet.proxy.lean: uvloop + httptools, the default) and
`mitmproxy` (meshlet.proxy.mitm: mitmproxy's proxy core, for user addons). Both are handed the
same `PolicyState` (the compiled table, swapped whole on apply), the same `ProxyMetrics` and the
same `SidecarConfig`; listeners, sniffing and mTLS are theirs.
"""

from __future__ import annotations

from typing import Protocol

from meshlet.proxy.config import SidecarConfig
from meshlet.proxy.state import PolicyState
from meshlet.proxy.tap import TapHub
from meshlet.telemetry.proxy import ProxyMetrics

ENGINES: tuple[str, ...] = ("lean", "mitmproxy")
DEFAULT_ENGINE = "lean"  # `meshlet run` without --engine (and without --addon, which needs mitmproxy)


class StartupError(Exception):
    """The sidecar could not start (a port in use, bad options): one line for the user."""


class Engine(Protocol):
    async def start(self) -> tuple[str, str]:
        """Bind the listeners; the bound outbound and inbound `host:port`. StartupError on failure."""
        ...

    def ready(self) -> bool:
        """The listeners are up (and, with mTLS, a certificate is held)."""
        ...

    def certs(self) -> dict:
        """What `GET /certs` shows (`{"identity": None}` without one)."""
        ...

    async def drain(self, timeout: float) -> None:
        """Stop accepting, let requests in flight finish (at most `timeout` seconds)."""
        ...

    async def close(self) -> None: ...


def make_engine(config: SidecarConfig, state: PolicyState, metrics: ProxyMetrics, tap: TapHub) -> Engine:
    """The engine `config.engine` names; imported only when chosen (mitmproxy is heavy)."""
    if config.engine == "mitmproxy":
        from meshlet.proxy.mitm.engine import MitmEngine

        return MitmEngine(config, state, metrics, tap)
    from meshlet.proxy.lean.engine import LeanEngine

    return LeanEngine(config, state, metrics, tap)
