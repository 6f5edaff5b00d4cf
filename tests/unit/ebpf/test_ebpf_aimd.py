"""The AIMD controller as a script of observations in and adjustments out (no kernel)."""

from __future__ import annotations

from meshlet.ebpf.aimd import AimdConfig, ClassLimits, Controller

MBIT = 1_000_000
CLASSES = (
    ClassLimits("latency", 0, 50 * MBIT, 100 * MBIT, 0.050),
    ClassLimits("default", 1, 30 * MBIT, 100 * MBIT, None),
    ClassLimits("bulk", 2, 10 * MBIT, 100 * MBIT, None),
)
CONTROLLER = Controller(CLASSES, AimdConfig(cut=0.5, step_fraction=0.1, calm_fraction=0.8, calm_intervals=3))


def run(script):
    state = CONTROLLER.initial()
    log = []
    for p99 in script:
        state, adjustments = CONTROLLER.step(state, {"latency": p99})
        log.append([(a.name, a.new, a.direction) for a in adjustments])
    return state, log


def test_breach_cuts_the_lower_classes_multiplicatively_down_to_their_rate():
    state, log = run([0.080, 0.080, 0.080, 0.080])
    assert log[0] == [("default", 50 * MBIT, "down"), ("bulk", 50 * MBIT, "down")]
    assert log[1] == [("default", 30 * MBIT, "down"), ("bulk", 25 * MBIT, "down")]  # floored at rate 30
    assert log[2] == [("bulk", 12_500_000, "down")]
    assert log[3] == [("bulk", 10 * MBIT, "down")]
    assert state.ceil == {"latency": 100 * MBIT, "default": 30 * MBIT, "bulk": 10 * MBIT}
    _, again = run([0.080] * 6)
    assert again[4:] == [[], []]  # at the floor: nothing more to cut, no log lines


def test_restores_additively_only_after_a_calm_streak():
    _, log = run([0.080, 0.010, 0.010, 0.010, 0.010])
    assert log[1:3] == [[], []]  # hysteresis: two calm intervals are not enough
    assert log[3] == [("default", 57 * MBIT, "up"), ("bulk", 59 * MBIT, "up")]  # +10% of (ceil - rate)
    assert log[4] == [("default", 64 * MBIT, "up"), ("bulk", 68 * MBIT, "up")]


def test_the_band_between_calm_and_breach_holds_and_resets_the_streak():
    _, log = run([0.080, 0.010, 0.010, 0.045, 0.010, 0.010, 0.010])
    assert log[1:6] == [[], [], [], [], []]  # 45 ms: under the SLO but above 80% of it
    assert log[6] and all(direction == "up" for _, _, direction in log[6])


def test_restore_stops_at_the_policy_ceil():
    state, log = run([0.080] + [0.010] * 40)
    assert state.ceil == {"latency": 100 * MBIT, "default": 100 * MBIT, "bulk": 100 * MBIT}
    assert log[-1] == []


def test_no_samples_is_not_a_breach():
    state, log = run([None, None])
    assert log == [[], []] and state.ceil["bulk"] == 100 * MBIT


def test_only_classes_below_the_breached_one_are_cut():
    controller = Controller(
        (ClassLimits("gold", 0, MBIT, 10 * MBIT, None), ClassLimits("silver", 1, MBIT, 10 * MBIT, 0.01),
         ClassLimits("bronze", 2, MBIT, 10 * MBIT, None))
    )
    _, adjustments = controller.step(controller.initial(), {"silver": 0.5})
    assert [a.name for a in adjustments] == ["bronze"]
    assert "silver p99 500.0ms > slo 10.0ms" in str(adjustments[0])
