"""A token bucket per identity: a workload that asks in a loop is slowed, others are not.

Keyed by SPIFFE ID, so every replica (and every `--workers` process) of one ServiceAccount shares
one budget: size it for the largest Deployment's renewals plus restarts. Pure but for the clock.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable

MAX_KEYS = 100_000  # past this, full (idle) buckets are forgotten: they would allow a burst anyway

_RATE = re.compile(r"(\d+)/(\d*)(s|m|h)")
_UNIT = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_rate(text: str) -> tuple[int, float]:
    """`120/m`, `10/s`, `600/5m` → (count, per seconds)."""
    match = _RATE.fullmatch(text.strip())
    if not match or int(match[1]) < 1 or match[2] == "0":
        raise ValueError(f"bad rate {text!r}: expected COUNT/PERIOD, e.g. 120/m, 10/s or 600/5m")
    return int(match[1]), float(match[2] or 1) * _UNIT[match[3]]


class RateLimiter:
    """`take(key)` spends one token: None when allowed, else seconds until the next token."""

    def __init__(self, count: int, per: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = float(count)
        self.refill = count / per  # tokens per second
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key → (tokens, at)
        self._lock = threading.Lock()  # the server handles requests in threads

    def take(self, key: str) -> float | None:
        now = self._clock()
        with self._lock:
            tokens, at = self._buckets.get(key, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - at) * self.refill)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                return (1.0 - tokens) / self.refill
            self._buckets[key] = (tokens - 1.0, now)
            if len(self._buckets) > MAX_KEYS:
                self._forget_full(now)
            return None

    def _forget_full(self, now: float) -> None:
        self._buckets = {k: (t, at) for k, (t, at) in self._buckets.items()
                         if t + (now - at) * self.refill < self.capacity}
