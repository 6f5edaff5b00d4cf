"""What `decide()` sees of a raw HTTP/1.1 request, decoded only when a rule asks.

Most routes test no header and no cookie, so decoding every field of every request into a
dict (what the mitmproxy engine's `request_view` does) would be wasted work on the hot path.
These views keep the raw `(name, value)` list llhttp produced and decode on first use.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from meshlet.proxy.lean.http1 import Header
from meshlet.routing import parse_cookies


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")  # as the mitmproxy engine decodes


class HeaderView(Mapping[str, str]):
    """Lower-cased names to their first value, over the raw fields."""

    __slots__ = ("_fields",)

    def __init__(self, fields: list[Header]) -> None:
        self._fields = fields

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        wanted = name.encode("latin-1")
        for raw_name, value in self._fields:
            if raw_name.lower() == wanted:
                return _text(value)
        return default

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def __iter__(self) -> Iterator[str]:
        seen: dict[str, None] = {}
        for raw_name, _ in self._fields:
            seen.setdefault(_text(raw_name).lower(), None)
        return iter(seen)

    def __len__(self) -> int:
        return sum(1 for _ in self)


class CookieView(Mapping[str, str]):
    """The Cookie fields joined (as the mitmproxy engine joins them) and parsed on first use."""

    __slots__ = ("_fields", "_parsed")

    def __init__(self, fields: list[Header]) -> None:
        self._fields = fields
        self._parsed: dict[str, str] | None = None

    def _cookies(self) -> dict[str, str]:
        if self._parsed is None:
            values = [_text(value) for name, value in self._fields if name.lower() == b"cookie"]
            self._parsed = parse_cookies("; ".join(values)) if values else {}
        return self._parsed

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return self._cookies().get(name, default)

    def __getitem__(self, name: str) -> str:
        return self._cookies()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._cookies())

    def __len__(self) -> int:
        return len(self._cookies())
