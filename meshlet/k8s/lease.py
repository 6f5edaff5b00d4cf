"""Leader election through a coordination.k8s.io/v1 Lease, as client-go's leaderelection does.

The core (`decide`) is pure: from the Lease as the API server returned it (or None), my
identity, the time now and the lease duration, it says whether to create, take over, renew or
follow, and gives the body to write. The write carries the resourceVersion that was read, so two
replicas racing for an expired Lease cannot both win: the API server answers 409 Conflict to the
slower one, which simply follows and looks again next period (`LeaseElector.step`).

Expiry is judged from the Lease's renewTime. Replicas of one Deployment share a node clock
closely enough for leases of several seconds; the margin between the renew period and the
duration (a third, by default) absorbs small skews.
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from meshlet.k8s.kube import Cluster, _describe, _unreachable

Action = Literal["create", "acquire", "renew", "follow"]


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    holder: str | None  # who holds the Lease once this decision is carried out
    body: dict | None  # the Lease to write (None when following)

    @property
    def leader(self) -> bool:
        return self.action != "follow"


def micro_time(at: float) -> str:
    """A MicroTime as the API server writes it: RFC 3339, microseconds, UTC."""
    return datetime.datetime.fromtimestamp(at, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None  # an unreadable renewTime counts as never renewed: the Lease is up for grabs


def expired(lease: dict, now: float) -> bool:
    spec = lease.get("spec") or {}
    if not spec.get("holderIdentity"):
        return True  # released
    renewed = parse_time(spec.get("renewTime")) or parse_time(spec.get("acquireTime"))
    duration = spec.get("leaseDurationSeconds") or 0
    return renewed is None or now >= renewed + duration


def decide(lease: dict | None, me: str, now: float, duration: int, name: str = "", namespace: str = "") -> Decision:
    """The next move for `me`: create a missing Lease, take a free or expired one, renew mine, or follow."""
    stamp = micro_time(now)
    if lease is None:
        spec = {"holderIdentity": me, "leaseDurationSeconds": duration, "acquireTime": stamp, "renewTime": stamp,
                "leaseTransitions": 0}
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": name, "namespace": namespace}, "spec": spec}
        return Decision("create", me, body)
    spec = dict(lease.get("spec") or {})
    holder = spec.get("holderIdentity") or None
    if holder == me:
        spec.update(renewTime=stamp, leaseDurationSeconds=duration)
        return Decision("renew", me, {**lease, "spec": spec})
    if not expired(lease, now):
        return Decision("follow", holder, None)
    spec.update(holderIdentity=me, leaseDurationSeconds=duration, acquireTime=stamp, renewTime=stamp,
                leaseTransitions=int(spec.get("leaseTransitions") or 0) + 1)
    return Decision("acquire", me, {**lease, "spec": spec})  # metadata keeps the resourceVersion read


# -- the I/O edge --------------------------------------------------------------------------------


class LeaseElector:
    """One replica's view of the Lease; call `step()` every `period` seconds (a third of `duration`).

    `api` is a `kubernetes.client.CoordinationV1Api`. Any API error or a lost race makes this
    replica a follower until the next step, so at most one replica acts as leader while the
    Lease it last wrote is fresh; a leader that cannot renew stops leading at once.
    """

    def __init__(self, api: object, namespace: str, name: str, identity: str, duration: int = 15,
                 clock: Callable[[], float] = time.time, log: Callable[[str], None] = lambda _: None):
        self.api, self.namespace, self.name, self.identity = api, namespace, name, identity
        self.duration, self.clock, self.log = duration, clock, log
        self.leader = False
        self.holder: str | None = None

    @property
    def period(self) -> float:
        """How often to step, and the bound on each API call: a call slower than this loses the lead."""
        return self.duration / 3

    def step(self) -> bool:
        """Read, decide, write; True while this replica holds the Lease."""
        from kubernetes.client.exceptions import ApiException

        was = (self.leader, self.holder)
        try:
            decision = decide(self._read(), self.identity, self.clock(), self.duration, self.name, self.namespace)
            if decision.action == "create":
                self.api.create_namespaced_lease(self.namespace, decision.body, _request_timeout=self.period)
            elif decision.body is not None:
                self.api.replace_namespaced_lease(self.name, self.namespace, decision.body,
                                                  _request_timeout=self.period)
            self.leader, self.holder = decision.leader, decision.holder
        except ApiException as e:
            if e.status != 409:
                self.log(f"lease {self.namespace}/{self.name}: {_describe(e)}; following until next period")
            self.leader = False  # 409: another replica wrote first; look again next period
        except _unreachable() as e:
            self.log(f"lease {self.namespace}/{self.name}: cannot reach the Kubernetes API: {e}")
            self.leader = False
        if (self.leader, self.holder) != was:  # a new term, ours or another's
            role = "is now the leader" if self.leader else f"follows {self.holder or 'nobody'}"
            self.log(f"lease {self.namespace}/{self.name}: {self.identity} {role}")
        return self.leader

    def release(self) -> None:
        """On a clean stop: free the Lease so a follower takes over at its next period, not after expiry."""
        from kubernetes.client.exceptions import ApiException

        if not self.leader:
            return
        self.leader = False
        try:
            lease = self._read()
            if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            spec = {**lease["spec"], "holderIdentity": None}
            self.api.replace_namespaced_lease(self.name, self.namespace, {**lease, "spec": spec},
                                              _request_timeout=self.period)
        except (ApiException, *_unreachable()):
            pass  # it will expire instead

    def _read(self) -> dict | None:
        from kubernetes.client.exceptions import ApiException

        try:
            response = self.api.read_namespaced_lease(self.name, self.namespace, _preload_content=False,
                                                      _request_timeout=self.period)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return json.loads(response.data)



def elector(cluster: Cluster, name: str, identity: str, duration: int = 15,
            log: Callable[[str], None] = lambda _: None) -> LeaseElector:
    """An elector in the cluster's namespace, sharing its API client (kubeconfig or in-cluster)."""
    from kubernetes import client

    api = client.CoordinationV1Api(cluster.api.api_client)
    return LeaseElector(api, cluster.namespace, name, identity, duration, log=log)
