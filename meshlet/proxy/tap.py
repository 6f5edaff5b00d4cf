"""Live request records for `meshlet tap`: engines publish, admin API subscribers read.

Tap costs nothing while nobody listens: engines test `hub.active` (one attribute read) before
building a record.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TapRecord:
    """One finished request, as `meshlet tap` prints it."""

    start: float  # wall clock, seconds since the epoch
    direction: str  # inbound | outbound
    method: str
    authority: str
    path: str
    route: str
    backend: str
    status: int  # 0: no response reached the client
    seconds: float
    peer_identity: str = ""  # the caller's SPIFFE ID, when mTLS verified one
    request_id: str = ""


class TapHub:
    """Placeholder until `meshlet tap` lands: nobody ever listens."""

    active = False

    def publish(self, record: TapRecord) -> None:
        pass
