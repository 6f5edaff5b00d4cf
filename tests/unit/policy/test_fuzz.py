"""The loader never raises anything but PolicyInvalid, and every error it reports is located.

Two generators: arbitrary YAML-ish text, and mutations of the real example policies (the
inputs most likely to reach deep into the validator).
"""

from __future__ import annotations

from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshlet.policy import PolicyInvalid, load_text
from meshlet.policy.model import PolicySet

EXAMPLES = sorted((Path(__file__).parents[3] / "policies").glob("*.yaml"))
EXAMPLE_TEXTS = [p.read_text() for p in EXAMPLES]


def assert_loads_or_locates(text: str) -> None:
    try:
        result = load_text(text, "fuzz.yaml")
    except PolicyInvalid as e:
        assert e.errors, "PolicyInvalid without errors"
        lines = text.count("\n") + 2
        for error in (*e.errors, *e.warnings):
            assert error.mark.file == "fuzz.yaml"
            assert 1 <= error.mark.line <= lines, str(error)
            assert error.mark.column >= 1, str(error)
            assert error.message and "\n" not in error.message, repr(error.message)
    else:
        assert isinstance(result, PolicySet)
        assert result.traffic or result.qos


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10, 200), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12), st.sampled_from(["v1", "v2", "100", "2s", "STRICT", "127.0.0.1:9081", "mesh", "ip", "http2", "unavailable"]),
)
keys = st.sampled_from([
    "apiVersion", "kind", "metadata", "spec", "name", "host", "backends", "routes", "to", "backend", "weight",
    "match", "headers", "cookies", "path", "prefix", "regex", "exact", "method", "sticky", "header", "cookie",
    "source", "timeout", "retries", "attempts", "on", "retryOn", "protocol", "mtls", "mode", "allow", "qos", "class", "interface",
    "classes", "rate", "ceil", "priority", "ports", "slo", "p99", "address", "tls", "identity", "dataplane",
]) | st.text(max_size=6)
trees = st.recursive(scalars, lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=5),
                     max_leaves=30)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300))
def test_arbitrary_text(text):
    assert_loads_or_locates(text)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees, st.sampled_from(["TrafficPolicy", "QoSPolicy"]))
def test_random_documents_with_a_real_kind(spec, kind):
    doc = {"apiVersion": "meshlet.dev/v1alpha1", "kind": kind, "metadata": {"name": "x"}, "spec": spec}
    assert_loads_or_locates(yaml.safe_dump(doc))


def _paths(tree, prefix=()):
    yield prefix
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from _paths(value, (*prefix, i))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(range(len(EXAMPLE_TEXTS))), st.data())
def test_mutated_example_policies(index, data):
    docs = [d for d in yaml.safe_load_all(EXAMPLE_TEXTS[index]) if d]
    doc = data.draw(st.sampled_from(docs))
    path = data.draw(st.sampled_from([p for p in _paths(doc) if p]))
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    action = data.draw(st.sampled_from(["replace", "delete", "rename"]))
    if action == "replace":
        parent[path[-1]] = data.draw(trees)
    elif action == "delete":
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent[data.draw(keys)] = parent.pop(path[-1])
    assert_loads_or_locates(yaml.safe_dump_all(docs))


def test_every_example_policy_is_valid():
    assert EXAMPLES, "policies/ has no examples"
    for path, text in zip(EXAMPLES, EXAMPLE_TEXTS, strict=True):
        assert isinstance(load_text(text, str(path)), PolicySet)


def test_deep_nesting_is_an_error_not_a_crash():
    assert_loads_or_locates("spec: " + "[" * 5000 + "]" * 5000)
