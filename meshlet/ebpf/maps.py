"""Small helpers over bcc tables shared by the observation and classification programs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def fill_port_map(table: Any, mapping: Mapping[int, int]) -> None:
    """Make a bcc hash table port -> value hold exactly `mapping`, changing only what differs."""
    for key in list(table):
        if key.value not in mapping:
            del table[key]
    for port, value in mapping.items():
        key = table.Key(port)
        if table.get(key) is None or table[key].value != value:
            table[key] = table.Leaf(value)
