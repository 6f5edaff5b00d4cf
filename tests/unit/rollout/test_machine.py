"""The rollout state machine as scripts of events in and states out: no clock, no network."""

from __future__ import annotations

import pytest

from meshlet.policy.model import Analysis, Rollout, Route, WeightedBackend
from meshlet.rollout.analysis import AnalysisResult, Observation
from meshlet.rollout.machine import Command, RolloutError, Tick, advance, start, weighted_route

SPEC = Rollout("v2", "v1", (5, 25, 50, 100), interval=30.0, analysis=Analysis(99.0, 0.3, 50), failure_limit=2)
OK = AnalysisResult("pass", Observation(100, 0, 0.01))
BAD = AnalysisResult("fail", Observation(100, 10, 0.01), ("success rate 90.00% below 99%",))
QUIET = AnalysisResult("hold", Observation(3, 0, 0.01), ("3 canary requests",))


def run(*results, spec=SPEC):
    state = start(spec, "canary", at=0.0)
    for i, result in enumerate(results, 1):
        state = advance(spec, state, Tick(float(i), result))
    return state


def test_passing_analyses_step_through_to_success():
    weights = [run(*[OK] * n).weight for n in range(5)]
    assert weights == [5, 25, 50, 100, 100]
    assert run(*[OK] * 4).phase == "Succeeded"
    assert [t.phase for t in run(*[OK] * 4).history] == ["Progressing"] * 4 + ["Succeeded"]


def test_low_traffic_holds_without_failing():
    state = run(QUIET, QUIET, QUIET)
    assert (state.phase, state.weight, state.failures, state.last) == ("Progressing", 5, 0, QUIET)


def test_rolls_back_after_failure_limit_with_the_reason():
    once = run(OK, BAD)
    assert (once.phase, once.weight, once.failures) == ("Progressing", 25, 1)
    twice = run(OK, BAD, BAD)
    assert (twice.phase, twice.weight) == ("RolledBack", 0)
    assert "success rate 90.00% below 99%" in twice.history[-1].reason


def test_commands():
    state = run(OK)
    paused = advance(SPEC, state, Command(9.0, "pause"))
    assert paused.phase == "Paused"
    assert advance(SPEC, paused, Tick(10.0, OK)).weight == 25, "a paused rollout does not step"
    resumed = advance(SPEC, paused, Command(11.0, "resume"))
    assert (resumed.phase, advance(SPEC, resumed, Tick(12.0, OK)).weight) == ("Progressing", 50)
    assert advance(SPEC, state, Command(9.0, "abort", "pager")).weight == 0
    assert advance(SPEC, state, Command(9.0, "abort")).phase == "Aborted"
    promoted = advance(SPEC, state, Command(9.0, "promote"))
    assert (promoted.phase, promoted.weight) == ("Succeeded", 100)


@pytest.mark.parametrize("state, action, message", [
    (run(OK), "resume", "is not paused"),
    (run(*[OK] * 4), "pause", "is Succeeded; nothing to pause"),
    (run(OK, BAD, BAD), "abort", "is RolledBack"),
])
def test_commands_that_do_not_apply_are_refused(state, action, message):
    with pytest.raises(RolloutError, match=message):
        advance(SPEC, state, Command(99.0, action))


def test_weighted_route_moves_only_canary_and_stable():
    route = Route("r", (WeightedBackend("v1", 60), WeightedBackend("v2", 20), WeightedBackend("v3", 20)))
    assert [t.weight for t in weighted_route(route, SPEC, 25).to] == [60, 20, 20]
    assert [t.weight for t in weighted_route(route, SPEC, 50).to] == [40, 40, 20]
    assert [t.weight for t in weighted_route(route, SPEC, 0).to] == [80, 0, 20]
    assert sum(t.weight for t in weighted_route(route, SPEC, 33).to) == 100
