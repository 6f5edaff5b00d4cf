"""The one override of mitmproxy internals: listeners bound with SO_REUSEPORT, for `--workers`.

mitmproxy 11 binds each TCP listener with `asyncio.start_server(handler, host, port)` in
`AsyncioServerInstance.listen` and offers no option for `reuse_port`. N worker processes
sharing one port need it, so the TCP case of that one method is replaced; everything else
(UDP, port 0) still goes to mitmproxy's own code. tests/unit/proxy/test_reuseport.py fails
loudly if mitmproxy moves or reshapes that method.
"""

from __future__ import annotations

import asyncio


def enable_reuse_port() -> None:
    from mitmproxy.proxy import mode_servers

    original = mode_servers.AsyncioServerInstance.listen
    if getattr(original, "meshlet_reuse_port", False):
        return

    async def listen(self, host: str, port: int) -> list:
        if self.mode.transport_protocol != "tcp" or port == 0:
            return await original(self, host, port)
        return [await asyncio.start_server(self.handle_stream, host or None, port, reuse_port=True)]

    listen.meshlet_reuse_port = True  # type: ignore[attr-defined]
    listen.__wrapped__ = original  # type: ignore[attr-defined]
    mode_servers.AsyncioServerInstance.listen = listen  # type: ignore[method-assign]
