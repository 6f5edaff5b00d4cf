"""Weighted choice among a route's backends: by per-request entropy, or sticky by a key.

Sticky choice is weighted rendezvous hashing (Schindelhauer & Schomaker, "Weighted distributed
hash tables", 2005): every backend scores `-w / ln(u)`, with `u` uniform in (0, 1) drawn from
a hash of (key, backend name), and the highest score wins. A backend wins with probability
`w / sum(w)`, and the score of a backend depends only on its own weight and name, so:
  - raising v2 from 10 to 20 raises only v2's scores: keys move to v2 (about 10%), none leave it;
  - removing a backend moves only the keys it held; adding one takes only its own share.
Hashing by backend *name* (not position) keeps keys in place when the route lists backends in
another order.
"""

from __future__ import annotations

import hashlib
import math
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")

_MASK64 = (1 << 64) - 1
# 52 bits keep (x + 0.5) / 2**52 exact in a double and strictly below 1, so ln(u) < 0.
_UNIFORM_BITS = 52
_UNIFORM_SCALE = 2.0**-_UNIFORM_BITS
_BLAKE2B_MAX_KEY = 64


def _keyed_hasher(name: str) -> hashlib.blake2b:
    """A blake2b keyed by the backend name; per request it is copied, never updated in place."""
    key = name.encode("utf-8", "surrogatepass")
    if len(key) > _BLAKE2B_MAX_KEY:
        key = hashlib.blake2b(key).digest()
    return hashlib.blake2b(digest_size=8, key=key)


def uniform(hasher: hashlib.blake2b, key: bytes) -> float:
    """A value in (0, 1) determined by (hasher's backend name, key)."""
    h = hasher.copy()
    h.update(key)
    x = int.from_bytes(h.digest(), "big") >> (64 - _UNIFORM_BITS)
    return (x + 0.5) * _UNIFORM_SCALE


@dataclass(frozen=True, slots=True, eq=False)
class WeightedSplit(Generic[T]):
    """Items with positive weights only: a weight-0 backend is dropped here, so it is never chosen."""

    items: tuple[T, ...]
    cumulative: tuple[int, ...]  # running sums of the weights, for `by_entropy`
    members: tuple[tuple[T, float, hashlib.blake2b], ...]  # (item, weight, keyed hasher), for `by_key`

    def by_entropy(self, entropy: int) -> T:
        """Maps a 64-bit draw onto [0, total) by multiply-shift, which is uniform (not `% total`)."""
        items = self.items
        if len(items) == 1:
            return items[0]
        point = ((entropy & _MASK64) * self.cumulative[-1]) >> 64
        return items[bisect_right(self.cumulative, point)]

    def by_key(self, key: bytes) -> T:
        items = self.items
        if len(items) == 1:
            return items[0]
        best, best_score = items[0], -1.0
        for item, weight, hasher in self.members:
            score = weight / -math.log(uniform(hasher, key))
            if score > best_score:
                best, best_score = item, score
        return best


def compile_split(choices: Sequence[tuple[str, int, T]]) -> WeightedSplit[T]:
    """`choices` are (name, weight, item); names key the sticky hash. Raises ValueError on bad weights."""
    kept = [(name, weight, item) for name, weight, item in choices if weight != 0]
    if any(weight < 0 for _, weight, _ in kept):
        raise ValueError("weights must not be negative")
    if not kept:
        raise ValueError("no backend has a positive weight")
    cumulative, running = [], 0
    for _, weight, _ in kept:
        running += weight
        cumulative.append(running)
    return WeightedSplit(
        items=tuple(item for _, _, item in kept),
        cumulative=tuple(cumulative),
        members=tuple((item, float(weight), _keyed_hasher(name)) for name, weight, item in kept),
    )
