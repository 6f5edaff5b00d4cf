"""Parsing the admin API's rollout requests: `GET /rollouts[/{policy}]`,
`POST /rollouts/{policy}/{start|pause|resume|abort|promote}[?route=R]`.

Pure: the admin API acts on the parsed call (under its apply lock) and turns errors into
400/404/405/409 with one line each.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, unquote

ACTIONS: tuple[str, ...] = ("start", "pause", "resume", "abort", "promote")


@dataclass(frozen=True, slots=True)
class RolloutCall:
    policy: str | None  # None: every rollout
    action: str | None  # None: status only
    route: str | None = None


class BadCall(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def parse_call(method: str, target: str) -> RolloutCall:
    """Raises BadCall(status, one line) for what the API does not offer."""
    path, _, query = target.partition("?")
    parts = [unquote(p) for p in path.split("/")[2:] if p]  # after "/rollouts"
    routes = parse_qs(query).get("route")
    route = routes[0] if routes else None
    if len(parts) <= 1:
        if method != "GET":
            raise BadCall(405, f"method {method} not allowed on {path}: GET it, POST to {path}/ACTION")
        return RolloutCall(parts[0] if parts else None, None)
    if len(parts) == 2:
        if method != "POST":
            raise BadCall(405, f"method {method} not allowed on {path}: POST to it")
        if parts[1] not in ACTIONS:
            raise BadCall(400, f"unknown rollout action {parts[1]!r}; one of {', '.join(ACTIONS)}")
        return RolloutCall(parts[0], parts[1], route)
    raise BadCall(404, f"not found: {path}; try /rollouts, /rollouts/POLICY, /rollouts/POLICY/ACTION")
