"""The SO_REUSEPORT override: it must still fit mitmproxy, and it must let two listeners share a port."""

from __future__ import annotations

import asyncio
import inspect
import socket

from mitmproxy.proxy import mode_servers
from mitmproxy.proxy.mode_specs import ProxyMode

from meshlet.proxy.mitm.reuseport import enable_reuse_port


def test_mitmproxy_still_binds_where_the_override_expects():
    """If this fails, mitmproxy moved its listener code: re-check meshlet/proxy/reuseport.py."""
    listen = mode_servers.AsyncioServerInstance.listen
    original = getattr(listen, "__wrapped__", listen)  # mitmproxy's own, whether or not overridden yet
    assert inspect.iscoroutinefunction(original)
    assert list(inspect.signature(original).parameters) == ["self", "host", "port"]
    assert issubclass(mode_servers.RegularInstance, mode_servers.AsyncioServerInstance)
    assert issubclass(mode_servers.ReverseInstance, mode_servers.AsyncioServerInstance)
    assert "asyncio.start_server(self.handle_stream, host, port)" in inspect.getsource(original)


def test_two_listeners_share_a_port_after_the_override():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    enable_reuse_port()
    enable_reuse_port()  # idempotent

    async def both() -> list[int]:
        mode = ProxyMode.parse(f"regular@127.0.0.1:{port}")
        first = mode_servers.ServerInstance.make(mode, None)
        second = mode_servers.ServerInstance.make(mode, None)
        servers = await first.listen("127.0.0.1", port) + await second.listen("127.0.0.1", port)
        try:
            return [s.sockets[0].getsockname()[1] for s in servers]
        finally:
            for s in servers:
                s.close()

    assert asyncio.run(both()) == [port, port]
