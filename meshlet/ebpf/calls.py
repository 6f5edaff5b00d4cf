"""How the agent calls into bcc and netlink: a refusal becomes one line saying what failed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class AgentError(Exception):
    """The kernel or bcc refused something the agent needs; the message is one line."""


def kernel(what: str, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a bcc or netlink call; its failure becomes one AgentError line saying what failed."""
    try:
        return call(*args, **kwargs)
    except (LookupError, AgentError, OSError):
        raise
    except Exception as e:  # bcc raises bare Exception; pyroute2 NetlinkError is not an OSError
        detail = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise AgentError(f"cannot {what}: {detail}") from e
