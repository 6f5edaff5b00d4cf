"""The QoS closed loop as a pure function: p99 observations in, ceil adjustments out.

On a breach of any SLO the ceil of every class below that SLO's class (higher priority number)
is cut multiplicatively, never under its guaranteed rate. Only after `calm_intervals`
consecutive intervals comfortably under every SLO (p99 below `calm_fraction` of it) are the
ceilings raised additively back towards the policy's. Between the two thresholds nothing moves:
that band, plus the streak, is the hysteresis that keeps the loop from flapping.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

from meshlet.policy.model import QoSPolicy


@dataclass(frozen=True, slots=True)
class AimdConfig:
    cut: float = 0.5  # multiply the lower classes' ceil by this on a breach
    step_fraction: float = 0.1  # restore this fraction of (policy ceil - rate) per calm interval
    calm_fraction: float = 0.8  # p99 below this share of the SLO counts as calm
    calm_intervals: int = 3  # calm intervals in a row before restoring


@dataclass(frozen=True, slots=True)
class ClassLimits:
    name: str
    priority: int
    rate: int  # bits/s, the floor
    ceil: int  # bits/s, the policy's ceiling, restored towards
    slo_p99: float | None  # seconds


@dataclass(frozen=True, slots=True)
class LoopState:
    ceil: Mapping[str, int]  # current ceil per class, bits/s
    calm_streak: int = 0


@dataclass(frozen=True, slots=True)
class Adjustment:
    name: str
    old: int
    new: int
    direction: Literal["down", "up"]
    reason: str

    def __str__(self) -> str:
        return f"qos: class {self.name} ceil {self.old} -> {self.new} bit/s ({self.direction}: {self.reason})"


@dataclass(frozen=True, slots=True)
class Controller:
    classes: tuple[ClassLimits, ...]
    config: AimdConfig = field(default_factory=AimdConfig)

    @classmethod
    def for_policy(cls, policy: QoSPolicy, config: AimdConfig | None = None) -> Controller:
        limits = tuple(
            ClassLimits(c.name, c.priority, c.rate, c.ceil, c.slo.p99 if c.slo else None) for c in policy.classes
        )
        return cls(limits, config or AimdConfig())

    def initial(self) -> LoopState:
        return LoopState({c.name: c.ceil for c in self.classes})

    def step(self, state: LoopState, p99: Mapping[str, float | None]) -> tuple[LoopState, tuple[Adjustment, ...]]:
        """One interval. `p99` maps each SLO'd class to its p99 RTT this interval (None: no samples)."""
        breached = [
            c for c in self.classes if c.slo_p99 is not None and (p := p99.get(c.name)) is not None and p > c.slo_p99
        ]
        if breached:
            return self._cut(state, breached, p99)
        calm = all(
            c.slo_p99 is None or (p := p99.get(c.name)) is None or p < c.slo_p99 * self.config.calm_fraction
            for c in self.classes
        )
        if not calm:
            return replace(state, calm_streak=0), ()
        streak = state.calm_streak + 1
        if streak < self.config.calm_intervals:
            return replace(state, calm_streak=streak), ()
        return self._restore(state)

    def _cut(
        self, state: LoopState, breached: list[ClassLimits], p99: Mapping[str, float | None]
    ) -> tuple[LoopState, tuple[Adjustment, ...]]:
        top = min(breached, key=lambda c: c.priority)
        observed, slo = p99.get(top.name) or 0.0, top.slo_p99 or 0.0
        reason = f"{top.name} p99 {observed * 1000:.1f}ms > slo {slo * 1000:.1f}ms"
        ceil = dict(state.ceil)
        out = []
        for c in self.classes:
            if c.priority <= top.priority:
                continue
            new = max(c.rate, int(ceil[c.name] * self.config.cut))
            if new != ceil[c.name]:
                out.append(Adjustment(c.name, ceil[c.name], new, "down", reason))
                ceil[c.name] = new
        return LoopState(ceil, 0), tuple(out)

    def _restore(self, state: LoopState) -> tuple[LoopState, tuple[Adjustment, ...]]:
        ceil = dict(state.ceil)
        out = []
        for c in self.classes:
            if ceil[c.name] >= c.ceil:
                continue
            new = min(c.ceil, ceil[c.name] + max(1, int((c.ceil - c.rate) * self.config.step_fraction)))
            out.append(Adjustment(c.name, ceil[c.name], new, "up", "every SLO met"))
            ceil[c.name] = new
        # The streak stays: each further calm interval restores one more step.
        return LoopState(ceil, state.calm_streak), tuple(out)
