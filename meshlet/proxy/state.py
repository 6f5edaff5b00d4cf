"""The running policy: one reference to an immutable routing table, replaced whole on apply.

Validation and compilation happen before the swap, so a rejected policy leaves the running
table untouched, and a request that read `state.table` keeps that table until it finishes.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshlet.policy import PolicyError, PolicyInvalid, load_text
from meshlet.policy.model import NOWHERE
from meshlet.routing import RoutingTable, compile_table


@dataclass(frozen=True, slots=True)
class Applied:
    """A compiled policy ready to swap in, with the text it came from (for GET /policy)."""

    table: RoutingTable
    source: str


def compile_policy(text: str, generation: int, file: str = "<policy>") -> Applied:
    """Validate and compile; raises PolicyInvalid with every located error, never half-applies."""
    policies = load_text(text, file)
    try:
        table = compile_table(policies.traffic, generation)
    except ValueError as e:
        raise PolicyInvalid([PolicyError(NOWHERE, str(e))]) from None
    return Applied(table, text)


class PolicyState:
    """Holder of the current table; `apply` is the only writer."""

    def __init__(self, applied: Applied):
        self.current = applied

    @property
    def table(self) -> RoutingTable:
        return self.current.table

    @property
    def generation(self) -> int:
        return self.current.table.generation

    def prepare(self, text: str, file: str = "<policy>", generation: int | None = None) -> Applied:
        """Compile `text` as the next generation (or `generation`) without touching the running table."""
        return compile_policy(text, self.generation + 1 if generation is None else generation, file)

    def swap(self, applied: Applied) -> None:
        self.current = applied

    def apply(self, text: str, file: str = "<policy>", generation: int | None = None) -> Applied:
        applied = self.prepare(text, file, generation)
        self.swap(applied)
        return applied
