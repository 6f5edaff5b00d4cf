"""Located policy errors and warnings: what the user sees as `FILE:LINE:COL: message`."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from meshlet.policy.model import Mark


@dataclass(frozen=True, slots=True)
class PolicyError:
    mark: Mark
    message: str

    def __str__(self) -> str:
        return f"{self.mark}: {self.message}"


@dataclass(frozen=True, slots=True)
class PolicyWarning(PolicyError):
    """Something that loads but should be written otherwise (a deprecated field): printed, never fatal."""

    def __str__(self) -> str:
        return f"{self.mark}: warning: {self.message}"


class PolicyInvalid(Exception):
    """A policy that failed to load or validate; `errors` holds every problem found.

    Errors of one file come in line order; files keep the order they were given in. `warnings`
    are those of the same load, so a user fixing the errors sees them too.
    """

    def __init__(self, errors: Iterable[PolicyError], warnings: Iterable[PolicyWarning] = ()):
        self.errors: tuple[PolicyError, ...] = tuple(errors)
        self.warnings: tuple[PolicyWarning, ...] = tuple(warnings)
        super().__init__("\n".join(str(e) for e in self.errors))
