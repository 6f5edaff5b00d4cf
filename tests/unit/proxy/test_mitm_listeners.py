"""The listener override: it must still fit mitmproxy, and bind with the sidecar's socket options."""

from __future__ import annotations

import asyncio
import inspect
import socket

from mitmproxy.proxy import mode_servers
from mitmproxy.proxy.mode_specs import ProxyMode

from meshlet.proxy.mitm.listeners import install_listeners


def test_mitmproxy_still_binds_where_the_override_expects():
    """If this fails, mitmproxy moved its listener code: re-check meshlet/proxy/mitm/listeners.py."""
    listen = mode_servers.AsyncioServerInstance.listen
    original = getattr(listen, "__wrapped__", listen)  # mitmproxy's own, whether or not overridden yet
    assert inspect.iscoroutinefunction(original)
    assert list(inspect.signature(original).parameters) == ["self", "host", "port"]
    assert issubclass(mode_servers.RegularInstance, mode_servers.AsyncioServerInstance)
    assert issubclass(mode_servers.ReverseInstance, mode_servers.AsyncioServerInstance)
    assert "asyncio.start_server(self.handle_stream, host, port)" in inspect.getsource(original)


def _listen_twice(spec: str, port: int) -> list[socket.socket]:
    async def both() -> list[socket.socket]:
        mode = ProxyMode.parse(spec)
        servers: list = []
        try:
            for _ in range(2):
                servers += await mode_servers.ServerInstance.make(mode, None).listen(mode.listen_host(), port)
            return [s.sockets[0].dup() for s in servers]
        finally:
            for s in servers:
                s.close()

    return asyncio.run(both())


def test_workers_share_a_port_with_reuse_port_and_every_listener_reuses_addresses():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    install_listeners(reuse_port=True)
    install_listeners(reuse_port=True)  # idempotent: wraps mitmproxy's own method, not the last override
    sockets = _listen_twice(f"regular@127.0.0.1:{port}", port)
    try:
        assert [s.getsockname()[1] for s in sockets] == [port, port]
        assert all(s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) for s in sockets)
    finally:
        for s in sockets:
            s.close()
    install_listeners(reuse_port=False)
    try:
        _listen_twice(f"regular@127.0.0.1:{port}", port)
    except OSError as e:
        assert "in use" in str(e)
    else:
        raise AssertionError("without SO_REUSEPORT a second listener must not share the port")
