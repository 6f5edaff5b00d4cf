"""The compiled routing table: host lookup, request matching, weighted and sticky splits.

Pure: the proxy edge builds a `RequestView`, calls `decide(table, view)` and acts on the
answer. Nothing here imports mitmproxy, sockets or the kernel.
"""

from meshlet.routing.cookies import parse_cookies
from meshlet.routing.request import Decision, RequestView, Unmatched
from meshlet.routing.table import RoutingTable, compile_table, decide

__all__ = [
    "Decision",
    "RequestView",
    "RoutingTable",
    "Unmatched",
    "compile_table",
    "decide",
    "parse_cookies",
]
