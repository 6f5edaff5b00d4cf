"""The policy lookups the mTLS addon makes: inbound settings and the `tls: mesh` backends by address."""

from __future__ import annotations

from meshlet.mtls.inbound import DEFAULT_MTLS, inbound_mtls, mesh_backends
from meshlet.policy import load_text

TWO = """\
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
---
apiVersion: meshlet.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: reviews}
spec:
  host: reviews
  backends:
    v1: {address: "127.0.0.1:9081"}
    v2: {address: "127.0.0.1:9082", tls: mesh, identity: "spiffe://cluster.local/ns/default/sa/reviews"}
  routes:
    - name: all
      to: [{backend: v1, weight: 50}, {backend: v2, weight: 50}]
  mtls: {mode: STRICT, allow: ["spiffe://cluster.local/ns/default/sa/frontend"]}
"""


def test_inbound_settings_come_from_the_first_policy_that_has_them():
    policies = load_text(TWO).traffic
    mtls = inbound_mtls(policies)
    assert mtls.mode == "STRICT"
    assert mtls.allow == ("spiffe://cluster.local/ns/default/sa/frontend",)


def test_without_mtls_sections_inbound_is_permissive():
    policies = load_text(TWO.split("---\n")[0]).traffic
    assert inbound_mtls(policies) == DEFAULT_MTLS
    assert DEFAULT_MTLS.mode == "PERMISSIVE" and DEFAULT_MTLS.allow == ()
    assert inbound_mtls(()) == DEFAULT_MTLS


def test_only_mesh_backends_are_looked_up_by_address():
    backends = mesh_backends(load_text(TWO).traffic)
    assert set(backends) == {("127.0.0.1", 9082)}
    assert backends["127.0.0.1", 9082].identity == "spiffe://cluster.local/ns/default/sa/reviews"
