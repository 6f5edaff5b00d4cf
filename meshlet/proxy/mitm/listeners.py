"""The one override of mitmproxy internals: its TCP listeners bind through meshlet.proxy.listen.

mitmproxy 11 binds each TCP listener with `asyncio.start_server(handler, host, port)` in
`AsyncioServerInstance.listen` and offers no option for the socket. The sidecar needs its own
options there: SO_REUSEADDR (a restart binds at once), SO_REUSEPORT for `--workers` (N worker
processes share one port), `::` as one dual-stack socket and `localhost` as both loopbacks. So
the TCP case of that one method is replaced; UDP still goes to mitmproxy's own code.
tests/unit/proxy/test_mitm_listeners.py fails loudly if mitmproxy moves or reshapes that method.
"""

from __future__ import annotations

import asyncio

from meshlet.policy.model import Address
from meshlet.proxy.listen import bind_listeners


def install_listeners(reuse_port: bool) -> None:
    """Bind mitmproxy's TCP listeners with the sidecar's options (process-wide; the last call wins)."""
    from mitmproxy.proxy import mode_servers

    installed = mode_servers.AsyncioServerInstance.listen
    original = getattr(installed, "__wrapped__", installed)

    async def listen(self, host: str, port: int) -> list:
        if self.mode.transport_protocol != "tcp":
            return await original(self, host, port)
        sockets = bind_listeners(Address(host, port), reuse_port)
        return [await asyncio.start_server(self.handle_stream, sock=sock) for sock in sockets]

    listen.__wrapped__ = original  # type: ignore[attr-defined]
    mode_servers.AsyncioServerInstance.listen = listen  # type: ignore[method-assign]
