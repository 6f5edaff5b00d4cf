"""The running policy: one reference to an immutable routing table, replaced whole on apply.

Validation and compilation happen before the swap, so a rejected policy leaves the running
table untouched, and a request that read `state.table` keeps that table until it finishes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meshlet.mtls.inbound import NO_LABELS, Labels
from meshlet.mtls.requirements import require_identity
from meshlet.policy import PolicyError, PolicyInvalid, load_text
from meshlet.policy.errors import PolicyWarning
from meshlet.policy.model import NOWHERE, TrafficPolicy
from meshlet.rollout.weights import Weights, apply_weights
from meshlet.routing import RoutingTable, compile_table


@dataclass(frozen=True, slots=True)
class Applied:
    """A compiled policy ready to swap in, with the text it came from (for GET /policy)."""

    table: RoutingTable
    source: str
    policies: tuple[TrafficPolicy, ...] = ()  # as written, before rollout weights
    weights: Weights = field(default_factory=dict)  # rollout overlay compiled into `table`
    warnings: tuple[PolicyWarning, ...] = ()  # what the loader said of `source` (deprecated fields)


def compile_policy(text: str, generation: int, file: str = "<policy>", weights: Weights | None = None) -> Applied:
    """Validate and compile; raises PolicyInvalid with every located error, never half-applies.

    Empty text is the empty table (every host passes through): what a `--watch-kube` sidecar
    runs before its namespace has a TrafficPolicy and after the last one is deleted. (A policy
    *file* must not be empty: `meshlet validate`, `apply` and `run --policy` use the loader.)
    """
    if not text.strip():
        return _compile((), "", generation, weights or {})
    loaded = load_text(text, file)
    return _compile(loaded.traffic, text, generation, weights or {}, loaded.warnings)


def reweigh(applied: Applied, weights: Weights, generation: int) -> Applied:
    """The same policy with another rollout overlay, as a new generation."""
    return _compile(applied.policies, applied.source, generation, weights, applied.warnings)


def _compile(policies: tuple[TrafficPolicy, ...], text: str, generation: int, weights: Weights,
             warnings: tuple[PolicyWarning, ...] = ()) -> Applied:
    try:
        table = compile_table(apply_weights(policies, weights), generation)
    except ValueError as e:
        raise PolicyInvalid([PolicyError(NOWHERE, str(e))], warnings) from None
    return Applied(table, text, policies, weights, warnings)


class PolicyState:
    """Holder of the current table; `apply` is the only writer."""

    def __init__(self, applied: Applied, has_identity: bool = True, workload_labels: Labels = NO_LABELS):
        self.current = applied
        self.has_identity = has_identity  # False: policies that need mTLS are refused by `prepare`
        self.workload_labels = workload_labels  # two mtls selectors picking this workload are refused too

    @property
    def table(self) -> RoutingTable:
        return self.current.table

    @property
    def generation(self) -> int:
        return self.current.table.generation

    def prepare(
        self, text: str, file: str = "<policy>", generation: int | None = None, weights: Weights | None = None
    ) -> Applied:
        """Compile `text` as the next generation (or `generation`) without touching the running table."""
        applied = compile_policy(text, self.generation + 1 if generation is None else generation, file, weights)
        require_identity(applied.policies, self.has_identity, self.workload_labels)
        return applied

    def swap(self, applied: Applied) -> None:
        self.current = applied

    def apply(self, text: str, file: str = "<policy>", generation: int | None = None) -> Applied:
        applied = self.prepare(text, file, generation)
        self.swap(applied)
        return applied
