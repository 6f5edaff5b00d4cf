"""Listening sockets for every listener of the sidecar, whichever engine serves it.

One function binds them all, so each gets the same options:
- SO_REUSEADDR always: a restarted sidecar binds at once although its old connections sit in
  TIME_WAIT on the port (without it the kernel refuses the bind for about a minute, and in a
  Pod a restart becomes a crash loop).
- SO_REUSEPORT for `--workers` workers, which share the data-plane ports; the kernel spreads
  connections. Never for a probe of whether a port is free (`claim_port`): that would succeed
  beside another process's SO_REUSEPORT listener of the same user and let two sidecars split a port.
- `::` is one dual-stack socket (IPv4 arrives as `::ffff:a.b.c.d`), so the inbound and health
  ports take IPv6 when the Pod has it; on a kernel without IPv6 it falls back to `0.0.0.0`.
- `localhost` is both loopbacks, 127.0.0.1 and ::1 (when the Pod has IPv6): where ip6tables
  REDIRECTs an app's outbound IPv6 connections.

The sockets are bound, not listening: hand each to `loop.create_server(sock=...)` (asyncio and
uvloop both call `listen()` themselves).
"""

from __future__ import annotations

import errno
import ipaddress
import socket

from meshlet.policy.model import Address

LOOPBACK_NAME = "localhost"
BACKLOG = 1024
_NO_IPV6 = (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT)


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or `localhost`: reachable only from this network namespace."""
    if host == LOOPBACK_NAME:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind_listeners(address: Address, reuse_port: bool = False) -> list[socket.socket]:
    """Bound, non-blocking TCP sockets for `address`; OSError (with its errno) when one cannot bind."""
    host = address.host.strip("[]")
    if host == LOOPBACK_NAME:
        first = _bind(socket.AF_INET, "127.0.0.1", address.port, reuse_port)
        try:
            second = _bind(socket.AF_INET6, "::1", first.getsockname()[1], reuse_port)
        except OSError as e:
            if e.errno not in _NO_IPV6:
                first.close()
                raise
            return [first]
        return [first, second]
    if host in ("::", ""):
        try:
            return [_bind(socket.AF_INET6, "::", address.port, reuse_port, dual_stack=True)]
        except OSError as e:
            if e.errno not in _NO_IPV6:
                raise
            host = "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return [_bind(family, host, address.port, reuse_port)]


def claim_port(address: Address) -> Address:
    """The address with a free port picked for port 0; OSError when the port is in use.

    A plain bind (SO_REUSEADDR only) fails beside a listener, so this tells whether some
    other process listens there before `--workers` workers bind it with SO_REUSEPORT.
    """
    sockets = bind_listeners(address)
    try:
        return Address(address.host, sockets[0].getsockname()[1])
    finally:
        for sock in sockets:
            sock.close()


def _bind(family: int, host: str, port: int, reuse_port: bool, dual_stack: bool = False) -> socket.socket:
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and
    # accepted sockets inherit it; without it Nagle meets delayed ACKs (~40 ms per request).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual_stack else 1)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
