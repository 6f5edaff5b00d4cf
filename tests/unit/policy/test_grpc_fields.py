"""`retries.retryOn` (and its deprecated old name `on`), gRPC retry conditions, `backends.*.protocol`:
exact FILE:LINE:COL messages for warnings and errors."""

from __future__ import annotations

import pytest

from meshlet.policy import PolicyInvalid, load_files, load_text
from meshlet.policy.diff import diff
from meshlet.policy.model import RETRY_CONDITIONS

HEAD = """\
apiVersion: meshlet.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: reviews}
spec:
  host: reviews
  backends:
    v1: {address: "127.0.0.1:9081"}
  routes:
    - name: all
      to: [{backend: v1}]
"""
WHY = "YAML 1.1 readers such as kubectl's read a bare `on:` key as the boolean true"
DEPRECATED = f"warning: TrafficPolicy 'reviews' spec.routes[0].retries: 'on' is deprecated, write 'retryOn': {WHY}"


def retries(body: str) -> str:
    return HEAD + f"      retries: {body}\n"  # line 11; the mapping opens at column 16


def invalid(text: str) -> PolicyInvalid:
    with pytest.raises(PolicyInvalid) as info:
        load_text(text, "p.yaml")
    return info.value


def test_retry_on_takes_http_and_grpc_conditions_without_warnings():
    loaded = load_text(retries("{attempts: 2, retryOn: [5xx, unavailable, resource-exhausted, cancelled, "
                               "deadline-exceeded, internal]}"), "p.yaml")
    assert loaded.traffic[0].routes[0].retries.on == (
        "5xx", "unavailable", "resource-exhausted", "cancelled", "deadline-exceeded", "internal")
    assert loaded.warnings == ()


def test_retry_on_defaults_to_connect_failure():
    assert load_text(retries("{attempts: 2}"), "p.yaml").traffic[0].routes[0].retries.on == ("connect-failure",)


@pytest.mark.parametrize("key", ["on", '"on"', "'on'"])
def test_deprecated_on_still_works_with_a_warning_at_its_key(key):
    loaded = load_text(retries(f"{{attempts: 2, {key}: [5xx, unavailable]}}"), "p.yaml")
    assert loaded.traffic[0].routes[0].retries.on == ("5xx", "unavailable")
    assert [str(w) for w in loaded.warnings] == [f"p.yaml:11:30: {DEPRECATED}"]


def test_deprecated_on_in_block_style_points_at_its_line():
    loaded = load_text(HEAD + "      retries:\n        attempts: 2\n        on: [5xx]\n", "p.yaml")
    assert [str(w) for w in loaded.warnings] == [f"p.yaml:13:9: {DEPRECATED}"]


def test_both_names_are_an_error_at_the_old_one():
    e = invalid(retries("{attempts: 2, retryOn: [5xx], on: [reset]}"))
    assert [str(x) for x in e.errors] == [
        "p.yaml:11:46: TrafficPolicy 'reviews' spec.routes[0].retries: give 'retryOn' only, "
        "not also 'on' (its deprecated old name)"]


def test_an_invalid_file_still_carries_its_warnings():
    e = invalid(retries("{attempts: 2, on: [5xxx]}"))
    assert [str(x) for x in e.errors] == [
        "p.yaml:11:35: TrafficPolicy 'reviews' spec.routes[0].retries.retryOn[0]: '5xxx' is not one of "
        f"{', '.join(RETRY_CONDITIONS)} (did you mean '5xx'?)"]
    assert [str(w) for w in e.warnings] == [f"p.yaml:11:30: {DEPRECATED}"]


@pytest.mark.parametrize(("condition", "hint"), [
    ("Unavailable", " (did you mean 'unavailable'?)"),
    ("deadline-exceded", " (did you mean 'deadline-exceeded'?)"),
    ("UNAVAILABLE(14)", ""),
])
def test_unknown_condition_suggests(condition, hint):
    e = invalid(retries(f"{{attempts: 2, retryOn: [{condition}]}}"))
    assert [str(x) for x in e.errors] == [
        f"p.yaml:11:40: TrafficPolicy 'reviews' spec.routes[0].retries.retryOn[0]: {condition!r} is not one of "
        f"{', '.join(RETRY_CONDITIONS)}{hint}"]


def test_misspelt_retry_on_suggests_the_new_name():
    e = invalid(retries("{attempts: 2, retryon: [5xx]}"))
    assert [str(x) for x in e.errors] == [
        "p.yaml:11:30: TrafficPolicy 'reviews' spec.routes[0].retries: unknown field 'retryon' "
        "(did you mean 'retryOn'?)"]


def test_load_files_gathers_the_warnings_of_every_file(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(retries("{attempts: 2, on: [5xx]}"))
    b.write_text(retries("{attempts: 2, on: [reset]}").replace("reviews", "ratings"))
    warnings = [str(w) for w in load_files([a, b]).warnings]
    assert warnings == [f"{a}:11:30: {DEPRECATED}", f"{b}:11:30: {DEPRECATED.replace('reviews', 'ratings')}"]


# -- backends.*.protocol -------------------------------------------------------------------------


def backend(fields: str, extra: str = "") -> str:
    return HEAD.replace('v1: {address: "127.0.0.1:9081"}', f'v1: {{address: "127.0.0.1:9081", {fields}}}') + extra


def test_protocol_defaults_to_auto():
    assert load_text(HEAD, "p.yaml").traffic[0].backends[0].protocol == "auto"


@pytest.mark.parametrize(("fields", "protocol"), [
    ("protocol: http2", "http2"),  # with tls none: h2c with prior knowledge
    ("protocol: http1", "http1"),
    ('protocol: http2, tls: mesh, identity: "spiffe://cluster.local/ns/default/sa/reviews"', "http2"),
])
def test_protocol_values(fields, protocol):
    loaded = load_text(backend(fields), "p.yaml")
    assert loaded.traffic[0].backends[0].protocol == protocol and loaded.warnings == ()


@pytest.mark.parametrize(("value", "hint"), [
    ("HTTP2", " (did you mean 'http2'?)"),
    ("http/2", " (did you mean 'http2'?)"),
    ("grpc", ""),
])
def test_unknown_protocol_is_an_error_with_a_suggestion(value, hint):
    e = invalid(backend(f"protocol: {value}"))
    assert [str(x) for x in e.errors] == [
        f"p.yaml:7:47: TrafficPolicy 'reviews' spec.backends.v1.protocol: {value!r} is not one of "
        f"http1, http2, auto{hint}"]


def test_kernel_dataplane_cannot_speak_a_protocol():
    e = invalid(backend("protocol: http2").replace("  backends:", "  dataplane: kernel\n  backends:"))
    assert [str(x) for x in e.errors] == [
        "p.yaml:8:5: backend 'v1': dataplane kernel passes the client's bytes as they are and cannot speak "
        "protocol http2; use protocol: auto, or dataplane: proxy"]


def test_diff_shows_a_protocol_change():
    old, new = load_text(HEAD, "a.yaml"), load_text(backend("protocol: http2"), "b.yaml")
    assert diff(old, new) == ["~ TrafficPolicy default/reviews:",
                              "    ~ backend v1: 127.0.0.1:9081 → 127.0.0.1:9081 protocol=http2"]
