"""One module per `meshlet` sub-command; each parses and prints, the logic lives elsewhere."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from meshlet.policy import PolicyInvalid
    from meshlet.policy.errors import PolicyWarning


class CommandError(Exception):
    """A user-facing failure: printed as one line `meshlet: message`, exit status 1."""


def print_warnings(warnings: Iterable[PolicyWarning]) -> None:
    """`FILE:LINE:COL: warning: message` on stderr; a warning never changes the exit status."""
    for warning in warnings:
        print(warning, file=sys.stderr)


def refused(e: PolicyInvalid) -> CommandError:
    """A policy that failed to load: its warnings and all but the last error printed here, the
    last error as the command's own error line."""
    print_warnings(e.warnings)
    for error in e.errors[:-1]:
        print(error, file=sys.stderr)
    return CommandError(str(e.errors[-1]))
