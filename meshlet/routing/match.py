"""Request matching, compiled once from `meshlet.policy.model.Match`.

Header, cookie and path regexes use `re.fullmatch` semantics: `regex: "beta|gamma"` matches the
whole value `beta`, not `beta-tester`. Write `beta.*` to match a prefix. Anchoring by default
is what users of exact and prefix matches expect, and it avoids a forgotten `^...$` letting
`x-group: not-beta` into the beta route.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass

from meshlet.policy.model import Match, StringMatch
from meshlet.routing.request import RequestView

# Called with the request's value; a truthy result means the value matches.
StringTest = Callable[[str], object]


def compile_string_match(match: StringMatch) -> StringTest:
    """A C-level callable where possible: these run once per rule per request."""
    if match.exact is not None:
        return match.exact.__eq__
    if match.prefix is not None:
        return operator.methodcaller("startswith", match.prefix)
    if match.regex is not None:
        try:
            return re.compile(match.regex).fullmatch
        except re.error as e:
            raise ValueError(f"{match.mark}: invalid regular expression {match.regex!r}: {e}") from e
    raise ValueError(f"{match.mark}: string match sets none of exact, prefix, regex")


@dataclass(frozen=True, slots=True)
class CompiledMatch:
    """All parts must hold; an empty part (no headers, no methods...) holds for every request."""

    headers: tuple[tuple[str, StringTest], ...]
    cookies: tuple[tuple[str, StringTest], ...]
    path: StringTest | None
    methods: frozenset[str]

    def matches(self, request: RequestView, path: str) -> bool:
        """`path` is the request path without its query string, cut once by the caller."""
        if self.methods and request.method not in self.methods:
            return False
        if self.path is not None and not self.path(path):
            return False
        headers = request.headers
        for name, test in self.headers:
            value = headers.get(name)
            if value is None or not test(value):
                return False
        cookies = request.cookies
        for name, test in self.cookies:
            value = cookies.get(name)
            if value is None or not test(value):
                return False
        return True


def compile_match(match: Match | None) -> CompiledMatch | None:
    """None for a default route (no match, or an empty one): it takes every request."""
    if match is None or match.is_empty:
        return None
    return CompiledMatch(
        headers=tuple((name.lower(), compile_string_match(m)) for name, m in match.headers),
        cookies=tuple((name, compile_string_match(m)) for name, m in match.cookies),
        path=compile_string_match(match.path) if match.path is not None else None,
        methods=frozenset(method.upper() for method in match.methods),
    )
