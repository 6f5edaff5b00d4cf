"""Where an iptables-redirected connection was going (SO_ORIGINAL_DST), read from its socket.

In a Pod, the init container's rules REDIRECT outbound TCP to :15001 and inbound TCP to :15006;
the kernel remembers each connection's original destination on its socket. Both engines ask it
once per connection.
"""

from __future__ import annotations

import socket
import struct

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h, at level SOL_IPV6 (= IPPROTO_IPV6)


def original_destination_of(sock: socket.socket) -> tuple[str, int] | None:
    """The redirected connection's original address; None when it came to the listener directly."""
    try:
        # By the local address, not the family: a dual-stack socket can carry IPv4 (`::ffff:a.b.c.d`),
        # and asking the wrong table for it is refused (mitmproxy's platform.linux reasons the same way).
        if "." in sock.getsockname()[0]:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            port, packed = struct.unpack_from("!2xH4s", raw)
            host = socket.inet_ntop(socket.AF_INET, packed)
        else:
            raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, 28)
            port, packed = struct.unpack_from("!2xH4x16s", raw)
            host = socket.inet_ntop(socket.AF_INET6, packed)
    except OSError:  # no NAT record: a direct connection
        return None
    local = sock.getsockname()
    if port == local[1] and host in (local[0], local[0].removeprefix("::ffff:")):
        return None
    return host, port
