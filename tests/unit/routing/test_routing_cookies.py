"""parse_cookies: agrees with http.cookies on well-formed headers, survives junk, never raises."""

from __future__ import annotations

from http.cookies import SimpleCookie

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshlet.routing import parse_cookies

TOKEN = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-.^_`|~"
COOKIE_OCTETS = TOKEN + "()/:<>?@[]{}"  # RFC 6265 cookie-octet, minus what SimpleCookie quotes


@pytest.mark.parametrize("header, cookies", [
    ("ab=B", {"ab": "B"}),
    ("ab=B; session=s-123", {"ab": "B", "session": "s-123"}),
    ("  ab = B ;session=x  ", {"ab": "B", "session": "x"}),
    ('q="a b"; e="x\\"y\\\\z"', {"q": "a b", "e": 'x"y\\z'}),
    ('o="line\\012break"', {"o": "line\nbreak"}),
    ('half="open', {"half": '"open'}),
    ("tok=a=b=c", {"tok": "a=b=c"}),
    ("empty=; ab=B", {"empty": "", "ab": "B"}),
    ("ab=first; ab=second", {"ab": "first"}),  # most specific (longest path) comes first
    ("junk; =novalue; ;; ab=B; ✓=ok; {bad}=1", {"ab": "B", "✓": "ok", "{bad}": "1"}),
    ("", {}),
    (";;;", {}),
])
def test_parse_cookies(header, cookies):
    assert parse_cookies(header) == cookies


def test_junk_does_not_hide_later_cookies_as_in_simplecookie():
    header = 'a=1; bad"cookie=2; ab=B'
    parsed = SimpleCookie()
    parsed.load(header)
    assert "ab" not in parsed  # SimpleCookie gives up at the junk
    assert parse_cookies(header)["ab"] == "B"


@pytest.mark.parametrize("value", [None, b"ab=B", 42])
def test_non_text_is_no_cookies(value):
    assert parse_cookies(value) == {}


names = st.text(TOKEN, min_size=1, max_size=12).map(lambda name: "c" + name)  # avoid $Path, expires...
values = st.text(COOKIE_OCTETS, max_size=20)


@settings(deadline=None)
@given(st.dictionaries(names, values, max_size=6))
def test_agrees_with_http_cookies_on_well_formed_headers(cookies):
    header = "; ".join(f"{name}={value}" for name, value in cookies.items())
    reference = SimpleCookie()
    reference.load(header)
    assert parse_cookies(header) == {name: morsel.value for name, morsel in reference.items()}


@settings(deadline=None)
@given(st.text(max_size=200))
def test_never_raises(header):
    cookies = parse_cookies(header)
    assert all(name and name == name.strip() for name in cookies)
