"""Policies that need a mesh identity are refused, at their location, by a sidecar that has none."""

from __future__ import annotations

import pytest

from meshlet.mtls.requirements import identity_problems, require_identity
from meshlet.policy import PolicyInvalid, load_text
from meshlet.proxy.state import PolicyState, compile_policy

PLAIN = """\
apiVersion: meshlet.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: ratings}
spec:
  host: ratings
  backends:
    v1: {address: "127.0.0.1:9091"}
  routes:
    - name: all
      to: [{backend: v1, weight: 100}]
  mtls: {mode: PERMISSIVE}
"""

NEEDS_IDENTITY = """\
apiVersion: meshlet.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: reviews}
spec:
  host: reviews
  backends:
    v1: {address: "127.0.0.1:9081"}
    v2: {address: "127.0.0.1:9082", tls: mesh}
  routes:
    - name: all
      to: [{backend: v1, weight: 50}, {backend: v2, weight: 50}]
  mtls: {mode: STRICT}
"""


def test_strict_and_mesh_backends_are_located():
    problems = identity_problems(load_text(NEEDS_IDENTITY, "p.yaml").traffic)
    assert [str(p).split(": ")[0] for p in problems] == ["p.yaml:8:5", "p.yaml:12:9"]
    assert "backend v2 has tls: mesh" in problems[0].message
    assert "mtls.mode STRICT needs a mesh identity" in problems[1].message
    assert all("--identity" in p.message for p in problems)


def test_permissive_and_plain_backends_need_nothing():
    assert identity_problems(load_text(PLAIN).traffic) == []
    require_identity(load_text(PLAIN).traffic, has_identity=False)


def test_an_identity_satisfies_everything():
    require_identity(load_text(NEEDS_IDENTITY).traffic, has_identity=True)
    with pytest.raises(PolicyInvalid, match="needs a mesh identity"):
        require_identity(load_text(NEEDS_IDENTITY).traffic, has_identity=False)


def test_state_without_identity_refuses_and_keeps_the_running_table():
    state = PolicyState(compile_policy(PLAIN, 1), has_identity=False)
    before = state.current
    with pytest.raises(PolicyInvalid, match=r"^policy:8:5: backend v2 has tls: mesh.*\npolicy:12:9: mtls.mode STRICT"):
        state.apply(NEEDS_IDENTITY, "policy")
    assert state.current is before and state.generation == 1
    assert PolicyState(compile_policy(PLAIN, 1)).apply(NEEDS_IDENTITY).table.generation == 2


def test_strict_for_other_workloads_needs_no_identity_here():
    scoped = PLAIN.replace("{mode: PERMISSIVE}", "{mode: STRICT, selector: {matchLabels: {app: ratings}}}")
    require_identity(load_text(scoped).traffic, has_identity=False, workload_labels={"app": "reviews"})
    with pytest.raises(PolicyInvalid, match=r"mtls\.mode STRICT needs a mesh identity"):
        require_identity(load_text(scoped).traffic, has_identity=False, workload_labels={"app": "ratings"})
