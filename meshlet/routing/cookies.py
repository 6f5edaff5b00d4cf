"""Cookie header parsing for the edge, forgiving where `http.cookies.SimpleCookie` is not.

SimpleCookie stops at the first malformed pair and drops everything after it, so one junk
cookie set by some other site's script would silently un-stick a user. This parser keeps
every well-formed `name=value` pair, unquotes values the way SimpleCookie does, and never
raises: a Cookie header is client input.
"""

from __future__ import annotations

import re

_ESCAPE = re.compile(r"\\(?:([0-3][0-7][0-7])|(.))", re.DOTALL)


def _unescape(m: re.Match[str]) -> str:
    return chr(int(m.group(1), 8)) if m.group(1) else m.group(2)


def _unquote(value: str) -> str:
    """`"a\\"b"` → `a"b` and `\\012` → newline, as `http.cookies` reads quoted values."""
    if len(value) < 2 or value[0] != '"' or value[-1] != '"':
        return value
    return _ESCAPE.sub(_unescape, value[1:-1])


def parse_cookies(header_value: str) -> dict[str, str]:
    """`a=1; b="x y"` → {"a": "1", "b": "x y"}.

    The first value of a repeated name wins: browsers send the most specific cookie (longest
    path) first (RFC 6265 §5.4). Pairs without `=` or without a name are skipped. HTTP/2 may
    split cookies over several header fields: the edge joins them with "; " first.
    """
    cookies: dict[str, str] = {}
    if not isinstance(header_value, str):
        return cookies
    for part in header_value.split(";"):
        name, sep, value = part.partition("=")
        name = name.strip()
        if sep and name:
            cookies.setdefault(name, _unquote(value.strip()))
    return cookies
