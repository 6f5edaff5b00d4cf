"""The policy lookups the mTLS addon makes: this workload's inbound settings (namespace default
plus a selector of its labels, never "the first policy with an mtls section") and the
`tls: mesh` backends by address."""

from __future__ import annotations

import pytest

from meshlet.k8s.labels import parse_labels
from meshlet.mtls.inbound import DEFAULT_MTLS, inbound_mtls, mesh_backends, mtls_conflicts
from meshlet.policy import PolicyInvalid, load_text
from meshlet.proxy.state import PolicyState, compile_policy

FRONTEND = "spiffe://cluster.local/ns/default/sa/frontend"


def doc(name: str, mtls: str = "", namespace: str = "default") -> str:
    return (
        f"apiVersion: meshlet.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: {name}, namespace: {namespace}}}\n"
        f"spec:\n  host: {name}\n  backends:\n    v1: {{address: \"127.0.0.1:9091\"}}\n"
        f"  routes:\n    - name: all\n      to: [{{backend: v1, weight: 100}}]\n" + (f"  mtls: {mtls}\n" if mtls else "")
    )


TWO = doc("ratings") + "---\n" + doc("reviews", f'{{mode: STRICT, allow: ["{FRONTEND}"]}}').replace(
    '    v1: {address: "127.0.0.1:9091"}\n',
    '    v1: {address: "127.0.0.1:9091"}\n'
    '    v2: {address: "127.0.0.1:9082", tls: mesh, identity: "spiffe://cluster.local/ns/default/sa/reviews"}\n',
)
# The issue's namespace: one service's policy must not set STRICT and its allow list for every sidecar.
SCOPED = "---\n".join([
    doc("details", "{mode: PERMISSIVE}"),
    doc("ratings", f'{{mode: STRICT, allow: ["{FRONTEND}"], selector: {{matchLabels: {{app: ratings}}}}}}'),
    doc("legacy", "{mode: DISABLE, selector: {matchLabels: {app: legacy, tier: old}}}"),
])


def test_a_section_without_selector_is_the_namespace_default_for_every_workload():
    policies = load_text(TWO).traffic
    for labels in ({}, {"app": "reviews"}, {"app": "ratings"}):
        mtls = inbound_mtls(policies, labels)
        assert mtls.mode == "STRICT" and mtls.allow == (FRONTEND,)


def test_a_selector_applies_to_the_workloads_it_matches():
    policies = load_text(SCOPED).traffic
    assert inbound_mtls(policies, {"app": "ratings", "version": "v1"}).mode == "STRICT"
    assert inbound_mtls(policies, {"app": "ratings"}).allow == (FRONTEND,)
    assert inbound_mtls(policies, {"app": "reviews"}).mode == "PERMISSIVE"  # the namespace default, not ratings'
    assert inbound_mtls(policies, {}).mode == "PERMISSIVE"
    assert inbound_mtls(policies, {"app": "legacy"}).mode == "PERMISSIVE"  # one of two labels: not selected
    assert inbound_mtls(policies, {"app": "legacy", "tier": "old"}).mode == "DISABLE"
    expressions = doc("canary", "{mode: STRICT, selector: {matchExpressions: [{key: track, operator: In, "
                                "values: [canary, beta]}]}}")
    scoped = load_text(expressions).traffic
    assert inbound_mtls(scoped, {"track": "beta"}).mode == "STRICT" and inbound_mtls(scoped, {}).mode == "PERMISSIVE"


def test_without_an_applicable_section_inbound_is_permissive():
    assert inbound_mtls(load_text(doc("ratings")).traffic, {}) == DEFAULT_MTLS
    assert DEFAULT_MTLS.mode == "PERMISSIVE" and DEFAULT_MTLS.allow == ()
    assert inbound_mtls(load_text(SCOPED.split("---\n", 1)[1]).traffic, {"app": "reviews"}) == DEFAULT_MTLS
    assert inbound_mtls((), {}) == DEFAULT_MTLS


@pytest.mark.parametrize(("second", "message"), [
    ("{mode: STRICT}", "p.yaml:23:9: mtls: namespace 'default' already has a default mtls section (at p.yaml:11:9); "
     "keep one, or give this one a selector: {matchLabels: {...}} naming its workloads"),
    ("{mode: STRICT, selector: {matchLabels: {app: ratings}}}",
     "p.yaml:23:9: mtls.selector {app=ratings} is already used by the mtls section at p.yaml:11:9; keep one"),
])
def test_validation_names_both_sections_that_claim_the_same_workloads(second, message):
    first = second.replace("STRICT", "PERMISSIVE")
    with pytest.raises(PolicyInvalid) as caught:
        load_text(doc("ratings", first) + "---\n" + doc("reviews", second), "p.yaml")
    assert [str(e) for e in caught.value.errors] == [message]


def test_defaults_of_two_namespaces_do_not_conflict():
    load_text(doc("ratings", "{mode: STRICT}") + "---\n" + doc("reviews", "{mode: STRICT}", namespace="shop"))


def test_two_selectors_picking_one_workload_are_refused_by_its_sidecar_and_named():
    text = SCOPED + "---\n" + doc("canary", "{mode: PERMISSIVE, selector: {matchLabels: {version: v2}}}")
    policies = load_text(text, "ns.yaml").traffic
    assert mtls_conflicts(policies, {"app": "ratings", "version": "v1"}) == []
    conflicts = mtls_conflicts(policies, {"app": "ratings", "version": "v2"})
    assert [str(c) for c in conflicts] == [
        "ns.yaml:47:9: mtls.selector {version=v2} and the one at ns.yaml:23:9 {app=ratings} both select this "
        "workload (app=ratings, version=v2); make them select different workloads"
    ]
    labels = {"app": "ratings", "version": "v2"}
    state = PolicyState(compile_policy(doc("x"), 1), has_identity=True, workload_labels=labels)
    with pytest.raises(PolicyInvalid, match="both select this workload"):
        state.prepare(text)
    assert state.generation == 1
    PolicyState(compile_policy(doc("x"), 1), workload_labels={"app": "reviews"}).prepare(text)  # not this one's problem


@pytest.mark.parametrize(("selector", "message"), [
    ("{matchLabels: {}}", "selector: name at least one label"),
    ("{}", "selector: name at least one label"),
    ("{matchExpressions: [{key: app, operator: In}]}", "operator In needs values"),
    ("{labels: {app: x}}", "unknown field 'labels'"),
])
def test_malformed_selectors_are_located(selector, message):
    with pytest.raises(PolicyInvalid, match=message) as caught:
        load_text(doc("ratings", f"{{mode: STRICT, selector: {selector}}}"), "p.yaml")
    assert str(caught.value.errors[0]).startswith("p.yaml:11:")


def test_workload_labels_are_read_from_the_downward_api_file():
    assert parse_labels('app="reviews"\npod-template-hash="7d9c"\n\nexample.com/tier="web"\n') == (
        ("app", "reviews"), ("example.com/tier", "web"), ("pod-template-hash", "7d9c"))
    with pytest.raises(ValueError, match=r"labels:2: expected key=\"value\""):
        parse_labels('app="reviews"\nversion=v1\n', "labels")


def test_only_mesh_backends_are_looked_up_by_address():
    backends = mesh_backends(load_text(TWO).traffic)
    assert set(backends) == {("127.0.0.1", 9082)}
    assert backends["127.0.0.1", 9082].identity == "spiffe://cluster.local/ns/default/sa/reviews"
