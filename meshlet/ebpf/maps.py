"""Small helpers over bcc tables shared by the observation, classification and split programs."""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Mapping
from typing import Any


def fill_map(table: Any, mapping: Mapping[int, int]) -> None:
    """Make a bcc hash table with integer keys and values hold exactly `mapping`, changing only what differs."""
    for key in list(table):
        if key.value not in mapping:
            del table[key]
    for port, value in mapping.items():
        key = table.Key(port)
        if table.get(key) is None or table[key].value != value:
            table[key] = table.Leaf(value)


def ipv4_key(host: str) -> int | None:
    """The address as the kernel's network-order u32 read on this machine, or None if not IPv4."""
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return None
    return struct.unpack("=I", socket.inet_aton(host))[0]


def ipv4_text(key: int) -> str:
    return socket.inet_ntoa(struct.pack("=I", key))
