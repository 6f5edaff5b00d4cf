"""The rollout state machine: a pure function from (spec, state, event) to the next state.

No clock, no I/O: the sidecar feeds it `Tick`s carrying an interval's analysis and applies the
weight of the state it returns. Every transition is recorded in `history`, which is what
`meshlet rollout status` shows and what a restart resumes from.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from meshlet.policy.model import Rollout, Route, WeightedBackend
from meshlet.rollout.analysis import AnalysisResult

Phase = Literal["Progressing", "Paused", "Succeeded", "RolledBack", "Aborted"]
PHASES: tuple[Phase, ...] = ("Progressing", "Paused", "Succeeded", "RolledBack", "Aborted")
ACTIVE: frozenset[str] = frozenset({"Progressing", "Paused"})


class RolloutError(Exception):
    """An event that does not apply in the current phase (e.g. resume while progressing)."""


class RolloutNotFound(RolloutError):
    """No such policy, rollout section or rollout (the admin API answers 404, not 409)."""


@dataclass(frozen=True, slots=True)
class Transition:
    at: float  # the caller's clock, seconds
    phase: Phase
    weight: int
    reason: str


@dataclass(frozen=True, slots=True)
class RolloutState:
    route: str
    phase: Phase
    step: int  # index into spec.steps
    weight: int  # the canary's weight now
    failures: int = 0
    last: AnalysisResult | None = None
    history: tuple[Transition, ...] = ()

    @property
    def active(self) -> bool:
        return self.phase in ACTIVE


@dataclass(frozen=True, slots=True)
class Tick:
    at: float
    result: AnalysisResult


@dataclass(frozen=True, slots=True)
class Command:
    """An operator's action: pause, resume, abort or promote."""

    at: float
    action: Literal["pause", "resume", "abort", "promote"]
    reason: str = ""


def start(spec: Rollout, route: str, at: float) -> RolloutState:
    weight = spec.steps[0]
    first = Transition(at, "Progressing", weight, f"started: canary {spec.canary} at step 1 ({weight}%)")
    return RolloutState(route, "Progressing", 0, weight, history=(first,))


def advance(spec: Rollout, state: RolloutState, event: Tick | Command) -> RolloutState:
    if isinstance(event, Command):
        return _command(state, event)
    if state.phase != "Progressing":
        return state  # paused or finished: analyses are not acted on
    result = event.result
    state = replace(state, last=result)
    if result.verdict == "hold":
        return state
    if result.verdict == "fail":
        failures = state.failures + 1
        if failures >= spec.failure_limit:
            reason = f"rolled back after {failures} failed analyses: {'; '.join(result.reasons)}"
            return _to(replace(state, failures=failures), event.at, "RolledBack", 0, reason)
        return replace(state, failures=failures)
    if state.step + 1 >= len(spec.steps):
        return _to(state, event.at, "Succeeded", state.weight, f"succeeded at {state.weight}%")
    step = state.step + 1
    weight = spec.steps[step]
    return _to(replace(state, step=step), event.at, "Progressing", weight, f"step {step + 1}: canary at {weight}%")


def _command(state: RolloutState, command: Command) -> RolloutState:
    why = f": {command.reason}" if command.reason else ""
    if not state.active:
        raise RolloutError(f"rollout of route {state.route!r} is {state.phase}; nothing to {command.action}")
    if command.action == "pause":
        if state.phase == "Paused":
            raise RolloutError(f"rollout of route {state.route!r} is already paused")
        return _to(state, command.at, "Paused", state.weight, f"paused{why}")
    if command.action == "resume":
        if state.phase != "Paused":
            raise RolloutError(f"rollout of route {state.route!r} is not paused")
        return _to(state, command.at, "Progressing", state.weight, f"resumed{why}")
    if command.action == "abort":
        return _to(state, command.at, "Aborted", 0, f"aborted{why}")
    return _to(state, command.at, "Succeeded", 100, f"promoted{why}")


def _to(state: RolloutState, at: float, phase: Phase, weight: int, reason: str) -> RolloutState:
    return replace(state, phase=phase, weight=weight, history=(*state.history, Transition(at, phase, weight, reason)))


def weighted_route(route: Route, spec: Rollout, canary_weight: int) -> Route:
    """The route with the canary at `canary_weight`% of the canary+stable share; others untouched."""
    pool = sum(t.weight for t in route.to if t.backend in (spec.canary, spec.stable))
    canary = round(pool * canary_weight / 100)
    weights = {spec.canary: canary, spec.stable: pool - canary}
    to = tuple(WeightedBackend(t.backend, weights.get(t.backend, t.weight), mark=t.mark) for t in route.to)
    return replace(route, to=to)
