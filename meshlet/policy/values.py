"""Parsers for the scalar formats policies use: durations, rates, addresses, SPIFFE IDs.

Each is a pure function that returns the value in base units or raises `ValueError` with a
message fit to follow `FILE:LINE:COL: `; the loader adds the position.
"""

from __future__ import annotations

import ipaddress
import re

from meshlet.policy.model import Address

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """`2s`, `150ms`, `1m30s`, `0.5s` → seconds. A bare number is refused: units are not guessed."""
    text = text.strip()
    pos, total = 0, 0.0
    while pos < len(text):
        part = _DURATION_PART.match(text, pos)
        if not part:
            raise ValueError(f"bad duration {text!r}: expected a number with a unit (ms, s, m, h), e.g. 2s or 150ms")
        total += float(part.group(1)) * _DURATION_UNITS[part.group(2)]
        pos = part.end()
    if not text:
        raise ValueError("bad duration '': expected e.g. 2s or 150ms")
    if total <= 0:
        raise ValueError(f"bad duration {text!r}: must be greater than zero")
    return total


# tc's units: "bit" suffixes are bits per second, "bps" suffixes are *bytes* per second.
_RATE = re.compile(r"(\d+(?:\.\d+)?)\s*(bit|kbit|mbit|gbit|bps|kbps|mbps|gbps)?", re.IGNORECASE)
_RATE_UNITS = {
    "bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9,
    "bps": 8, "kbps": 8 * 10**3, "mbps": 8 * 10**6, "gbps": 8 * 10**9,
}


def parse_rate(text: str | int) -> int:
    """`50mbit` → 50_000_000 bits/s, with tc's units (`mbps` is megabytes/s, as in tc)."""
    if isinstance(text, int):
        bits = text
    else:
        m = _RATE.fullmatch(text.strip())
        if not m:
            raise ValueError(f"bad rate {text!r}: expected e.g. 50mbit, 500kbit, 1gbit (tc units)")
        bits = int(float(m.group(1)) * _RATE_UNITS[(m.group(2) or "bit").lower()])
    if bits <= 0:
        raise ValueError(f"bad rate {text!r}: must be greater than zero")
    return bits


_DNS_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)", re.IGNORECASE)


def is_hostname(text: str) -> bool:
    """An RFC 1123 name such as `reviews` or `reviews.default.svc.cluster.local`."""
    if not text or len(text) > 253:
        return False
    return all(_DNS_LABEL.fullmatch(label) for label in text.rstrip(".").split("."))


def parse_address(text: str) -> Address:
    """`127.0.0.1:9081`, `[::1]:9081` or `reviews-v1.default.svc:9080` → Address."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"bad address {text!r}: expected [IPv6]:PORT")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"bad address {text!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"bad address {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9081")
        if not is_hostname(host):
            raise ValueError(f"bad address {text!r}: {host!r} is neither an IP address nor a DNS name")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"bad address {text!r}: port must be a number from 1 to 65535")
    return Address(host, int(port))


_SPIFFE = re.compile(r"spiffe://([a-z0-9._-]+)((?:/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)+)")


def parse_spiffe_id(text: str) -> str:
    """Check a SPIFFE ID (`spiffe://cluster.local/ns/default/sa/reviews`) and return it unchanged."""
    m = _SPIFFE.fullmatch(text)
    if not m:
        raise ValueError(
            f"bad SPIFFE ID {text!r}: expected spiffe://TRUST_DOMAIN/PATH, "
            "e.g. spiffe://cluster.local/ns/default/sa/reviews (lower-case trust domain, no trailing slash)"
        )
    if any(seg in (".", "..") for seg in m.group(2).split("/")):
        raise ValueError(f"bad SPIFFE ID {text!r}: path segments '.' and '..' are not allowed")
    return text


def parse_vip(text: str) -> Address:
    """A kernel split's virtual address: an IPv4 literal and a port (the connect4 hook is IPv4)."""
    address = parse_address(text)
    try:
        ipaddress.IPv4Address(address.host)
    except ValueError:
        raise ValueError(f"bad virtual address {text!r}: expected IPV4:PORT, e.g. 10.96.0.20:9080") from None
    return address


_LABEL_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?")


def parse_label_key(key: str) -> str:
    """A Kubernetes label key, `name` or `prefix/name` (the prefix a DNS name)."""
    prefix, _, name = key.rpartition("/")
    if (prefix and not is_hostname(prefix)) or not _LABEL_NAME.fullmatch(name):
        raise ValueError(f"{key!r} is not a Kubernetes label key (e.g. app or example.com/tier)")
    return key


def parse_label_value(value: str) -> str:
    if value and not _LABEL_NAME.fullmatch(value):
        raise ValueError(f"{value!r} is not a Kubernetes label value (63 characters: letters, digits, - _ .)")
    return value
