"""Every validation error names the right line and column, and all errors of a file are reported."""

from __future__ import annotations

import textwrap

import pytest

from meshlet.policy import PolicyInvalid, load_text

HEAD = """\
apiVersion: meshlet.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: reviews}
spec:
  host: reviews
"""

BACKENDS = """\
  backends:
    v1: {address: "127.0.0.1:9081"}
    v2: {address: "127.0.0.1:9082"}
"""


def errors_of(text: str) -> list[str]:
    with pytest.raises(PolicyInvalid) as info:
        load_text(textwrap.dedent(text), "p.yaml")
    return [str(e) for e in info.value.errors]


def only_error(text: str) -> str:
    errors = errors_of(text)
    assert len(errors) == 1, errors
    return errors[0]


def test_unknown_field_names_the_key_and_suggests():
    error = only_error(HEAD + BACKENDS + """\
  routes:
    - name: canary
      to: [{backend: v1, wieght: 100}]
""")
    assert error.startswith("p.yaml:11:26: ")
    assert "unknown field 'wieght'" in error and "did you mean 'weight'" in error


def test_wrong_type():
    error = only_error(HEAD + "  backends: [v1]\n  routes: [{name: a, to: [{backend: v1}]}]\n")
    assert error.startswith("p.yaml:6:13: ") and "expected a mapping, got a list" in error


@pytest.mark.parametrize("weight, message", [
    ("ninety", "expected an integer, got the string 'ninety'"),
    ("90.5", "expected an integer, got the number 90.5"),
    ("true", "expected an integer, got the boolean true"),
    ("-5", "out of range"),
])
def test_weight_not_an_integer(weight, message):
    error = only_error(HEAD + BACKENDS + f"""\
  routes:
    - name: canary
      to: [{{backend: v1, weight: {weight}}}, {{backend: v2, weight: 10}}]
""")
    assert error.startswith("p.yaml:11:34: ") and message in error


def test_weights_not_summing_to_100_point_at_the_split():
    error = only_error(HEAD + BACKENDS + """\
  routes:
    - name: canary
      to:
        - {backend: v1, weight: 90}
        - {backend: v2, weight: 20}
""")
    assert error == "p.yaml:12:11: route 'canary': weights sum to 110, must be 100"


def test_unknown_backend():
    error = only_error(HEAD + BACKENDS + """\
  routes:
    - name: canary
      to: [{backend: v1, weight: 90}, {backend: v3, weight: 10}]
""")
    assert error.startswith("p.yaml:11:39: ") and "unknown backend 'v3' (backends: v1, v2)" in error


def test_duplicate_backend_and_route_names():
    errors = errors_of(HEAD + """\
  backends:
    v1: {address: "127.0.0.1:9081"}
    v1: {address: "127.0.0.1:9082"}
  routes:
    - {name: a, to: [{backend: v1}]}
""")
    assert errors == ["p.yaml:8:5: TrafficPolicy 'reviews' spec.backends: duplicate key 'v1' (first defined at line 7)"]
    error = only_error(HEAD + BACKENDS + """\
  routes:
    - {name: a, match: {path: {prefix: /x}}, to: [{backend: v1}]}
    - {name: a, to: [{backend: v2}]}
""")
    assert error.startswith("p.yaml:11:7: ") and "duplicate route name (first at line 10)" in error


@pytest.mark.parametrize("duration", ["2", "2 seconds", "-1s", "0s", "2sec", '""'])
def test_bad_duration(duration):
    error = only_error(HEAD + BACKENDS + f"""\
  routes:
    - name: canary
      to: [{{backend: v1}}]
      timeout: {duration}
""")
    assert error.startswith("p.yaml:12:16: ") and "duration" in error


def test_good_durations_are_seconds():
    for text, seconds in [("2s", 2.0), ("150ms", 0.15), ("1m30s", 90.0), ("0.5s", 0.5)]:
        policies = load_text(HEAD + BACKENDS + f"  routes:\n    - {{name: a, to: [{{backend: v1}}], timeout: {text}}}\n")
        assert policies.traffic[0].routes[0].timeout == pytest.approx(seconds)


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.1:0", "127.0.0.1:70000", "bad host:80", ":80", "[::1:80"])
def test_bad_address(address):
    error = only_error(HEAD + f"""\
  backends:
    v1: {{address: "{address}"}}
  routes:
    - {{name: a, to: [{{backend: v1}}]}}
""")
    assert error.startswith("p.yaml:7:19: ") and "bad address" in error


def test_bad_mtls_mode_suggests_the_spelling():
    error = only_error(HEAD + BACKENDS + "  routes:\n    - {name: a, to: [{backend: v1}]}\n  mtls: {mode: strict}\n")
    assert error.startswith("p.yaml:11:16: ") and "did you mean 'STRICT'" in error


def test_empty_to():
    error = only_error(HEAD + BACKENDS + "  routes:\n    - {name: a, to: []}\n")
    assert error.startswith("p.yaml:10:21: ") and "empty" in error


def test_matched_route_after_the_default_is_unreachable():
    error = only_error(HEAD + BACKENDS + """\
  routes:
    - name: everyone
      to: [{backend: v1}]
    - name: beta
      match: {headers: {x-group: beta}}
      to: [{backend: v2}]
""")
    assert error.startswith("p.yaml:12:7: ") and "route 'beta' can never match" in error


@pytest.mark.parametrize("route, need", [
    ("{name: a, match: {headers: {x: y}}, to: [{backend: v1}]}", "a request match"),
    ("{name: a, to: [{backend: v1}], retries: {attempts: 2}}", "retries"),
    ("{name: a, to: [{backend: v1}], timeout: 1s}", "a timeout"),
    ("{name: a, to: [{backend: v1, weight: 50}, {backend: v2, weight: 50}], sticky: {header: u}}", "stickiness"),
])
def test_kernel_dataplane_refuses_l7_routes(route, need):
    error = only_error(HEAD + "  dataplane: kernel\n" + BACKENDS + f"  routes:\n    - {route}\n")
    assert error.startswith("p.yaml:11:7: ") and need in error and "dataplane kernel" in error


def test_kernel_dataplane_refuses_mesh_tls():
    error = only_error(HEAD + """\
  dataplane: kernel
  backends:
    v1: {address: "127.0.0.1:9081", tls: mesh}
  routes:
    - {name: a, to: [{backend: v1}]}
""")
    assert error.startswith("p.yaml:8:5: ") and "mesh TLS" in error


def test_kernel_dataplane_accepts_a_plain_split():
    policies = load_text(HEAD + "  dataplane: kernel\n" + BACKENDS + """\
  routes:
    - {name: a, to: [{backend: v1, weight: 90}, {backend: v2, weight: 10}], sticky: {source: ip}}
""")
    assert policies.traffic[0].dataplane == "kernel"


QOS = """\
apiVersion: meshlet.dev/v1alpha1
kind: QoSPolicy
metadata: {name: node}
spec:
  interface: eth0
  classes:
"""


def test_qos_rate_above_ceil():
    error = only_error(QOS + "    latency: {priority: 0, rate: 200mbit, ceil: 100mbit}\n")
    assert error.startswith("p.yaml:7:5: ") and "rate 200000000 bit/s is above ceil 100000000 bit/s" in error


def test_qos_port_in_two_classes():
    error = only_error(QOS + """\
    latency: {priority: 0, rate: 50mbit, ports: [9081, 9082]}
    bulk: {priority: 2, rate: 10mbit, ports: [9000, 9082]}
""")
    assert error.startswith("p.yaml:8:5: ") and "port 9082 is already in class 'latency'" in error


def test_qos_values_in_base_units():
    policy = load_text(QOS + "    latency: {priority: 0, rate: 50mbit, ceil: 1gbit, slo: {p99: 50ms}, ports: [9081]}\n").qos[0]
    (cls,) = policy.classes
    assert (cls.rate, cls.ceil, cls.slo.p99, cls.ports) == (50_000_000, 1_000_000_000, 0.05, (9081,))


def test_qos_pod_and_node_selectors_match_as_kubernetes_does():
    policy = load_text(QOS.replace("  interface: eth0\n", "  interface: eth0\n  nodeSelector: {matchLabels: {pool: edge}}\n") + """\
    latency: {priority: 0, rate: 5mbit, podSelector: {matchLabels: {tier: web}, matchExpressions: [
               {key: canary, operator: DoesNotExist}]}}
    bulk: {priority: 2, rate: 1mbit, podSelector: {matchExpressions: [{key: tier, operator: In, values: [batch, web]}]}}
    default: {priority: 1, rate: 1mbit}
""").qos[0]
    assert policy.node_selector.matches({"pool": "edge"}) and not policy.node_selector.matches({"pool": "core"})
    assert policy.class_of({"tier": "web"}) == "latency", "both select it: the lowest priority number wins"
    assert policy.class_of({"tier": "web", "canary": "yes"}) == "bulk"
    assert policy.class_of({"tier": "batch"}) == "bulk"
    assert policy.class_of({"app": "x"}) is None, "no selector takes it: its ports, or the default class"


@pytest.mark.parametrize(("selector", "where", "message"), [
    ("{matchLabels: {tier: [a]}}", "7:75", "podSelector.matchLabels.tier: expected a string"),
    ("{matchExpressions: [{key: tier, operator: In}]}", "7:74", "operator In needs values"),
    ("{matchExpressions: [{key: tier, operator: Exists, values: [a]}]}", "7:112", "operator Exists takes no values"),
    ("{matchExpressions: [{key: tier, operator: in, values: [a]}]}", "7:96", "'in' is not one of In, NotIn, Exists, DoesNotExist (did you mean 'In'?)"),
    ("{matchLabel: {tier: web}}", "7:55", "unknown field 'matchLabel' (did you mean 'matchLabels'?)"),
])
def test_selector_errors_are_located(selector, where, message):
    error = only_error(QOS + f"    latency: {{priority: 0, rate: 5mbit, podSelector: {selector}}}\n")
    assert error.startswith(f"p.yaml:{where}: ") and message in error, error


def test_malformed_yaml_reports_the_parser_position():
    error = only_error("apiVersion: meshlet.dev/v1alpha1\nkind: [TrafficPolicy\nspec: {}\n")
    assert error.startswith("p.yaml:3:5: malformed YAML")


def test_tab_indentation_is_malformed_yaml():
    error = only_error("kind: TrafficPolicy\nspec:\n\thost: x\n")
    assert error.startswith("p.yaml:3:1: malformed YAML")


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n---\n"])
def test_empty_file(text):
    assert only_error(text) == "p.yaml:1:1: empty policy file: expected at least one TrafficPolicy or QoSPolicy document"


def test_unknown_kind_and_api_version():
    errors = errors_of("apiVersion: meshlet.dev/v2\nkind: TraficPolicy\nmetadata: {name: x}\nspec: {}\n")
    assert errors[0].startswith("p.yaml:1:13: apiVersion: 'meshlet.dev/v2' is not supported")
    assert errors[1].startswith("p.yaml:2:7: kind: 'TraficPolicy'") and "did you mean 'TrafficPolicy'" in errors[1]


def test_all_errors_of_a_file_are_collected_in_line_order():
    errors = errors_of(HEAD + """\
  backends:
    v1: {address: "127.0.0.1:9081", color: red}
    v2: {address: "localhost"}
  routes:
    - name: canary
      to: [{backend: v1, weight: 90}, {backend: v2, weight: 10}]
      timeout: soon
---
apiVersion: meshlet.dev/v1alpha1
kind: QoSPolicy
metadata: {name: node}
spec:
  interface: eth0
  classes:
    bulk: {priority: 9, rate: 10mbit}
""")
    lines = [int(e.split(":")[1]) for e in errors]
    assert lines == [7, 8, 12, 20], errors


def test_two_policies_for_one_host_across_files(tmp_path):
    from meshlet.policy import load_files

    body = HEAD + BACKENDS + "  routes:\n    - {name: a, to: [{backend: v1}]}\n"
    (tmp_path / "a.yaml").write_text(body)
    (tmp_path / "b.yaml").write_text(body.replace("name: reviews", "name: reviews-2"))
    with pytest.raises(PolicyInvalid) as info:
        load_files([tmp_path / "a.yaml", tmp_path / "b.yaml"])
    (error,) = info.value.errors
    assert str(error).startswith(f"{tmp_path / 'b.yaml'}:5:3: host 'reviews' is already governed")


def test_unreadable_file_is_a_located_error(tmp_path):
    from meshlet.policy import load_files

    with pytest.raises(PolicyInvalid, match=r"missing.yaml:1:1: cannot read policy file: No such file"):
        load_files([tmp_path / "missing.yaml"])


ROLLOUT_ROUTE = HEAD + BACKENDS + """\
  routes:
    - name: canary
      to: [{backend: v1, weight: 100}, {backend: v2, weight: 0}]
      rollout:
        canary: v2
        stable: v1
        steps: [5, 25, 50, 100]
        interval: 30s
        analysis: {success_rate: {min: 99.5}, p99: {max: 300ms}, min_requests: 20}
        failure_limit: 3
"""


def test_rollout_section_loads_in_base_units():
    rollout = load_text(ROLLOUT_ROUTE).traffic[0].routes[0].rollout
    assert (rollout.canary, rollout.stable, rollout.steps, rollout.interval, rollout.failure_limit) == (
        "v2", "v1", (5, 25, 50, 100), 30.0, 3)
    assert (rollout.analysis.min_success_rate, rollout.analysis.max_p99, rollout.analysis.min_requests) == (99.5, 0.3, 20)


@pytest.mark.parametrize("old, new, where, message", [
    ("steps: [5, 25, 50, 100]", "steps: [5, 50, 25, 100]", "13:9", "steps must strictly ascend, got [5, 50, 25, 100]"),
    ("steps: [5, 25, 50, 100]", "steps: [5, 25, 150]", "15:24", "150 is out of range, must be from 1 to 100"),
    ("canary: v2", "canary: v3", "13:9", "canary 'v3' is not a backend of this route"),
    ("stable: v1", "stable: v2", "13:9", "canary and stable are both 'v2'"),
    ("min: 99.5", "min: 101", "17:40", "out of range, must be from 0 to 100"),
    ("max: 300ms", "max: fast", "17:58", "bad duration 'fast'"),
    ("failure_limit: 3", "failure_limit: 0", "18:24", "0 is out of range"),
    ("interval: 30s", "intervall: 30s", "16:9", "unknown field 'intervall' (did you mean 'interval'?)"),
])
def test_rollout_errors(old, new, where, message):
    assert old in ROLLOUT_ROUTE
    error = only_error(ROLLOUT_ROUTE.replace(old, new))
    assert error.startswith(f"p.yaml:{where}: ") and message in error, error


def test_names_that_become_metric_labels_are_plain():
    error = only_error(HEAD + BACKENDS + '  routes:\n    - {name: "canary route", to: [{backend: v1}]}\n')
    assert error.startswith("p.yaml:10:14: ") and "name 'canary route' must be letters, digits" in error
    error = only_error(HEAD + '  backends:\n    "v1\\n": {address: "127.0.0.1:1"}\n  routes:\n    - {name: a, to: [{backend: v1}]}\n')
    assert error.startswith("p.yaml:7:5: ") and "\n" not in error


def test_vip_is_an_ipv4_address_and_port():
    policy = load_text(HEAD + '  vip: "10.96.0.20:9080"\n' + BACKENDS + "  routes:\n    - {name: a, to: [{backend: v1}]}\n")
    assert str(policy.traffic[0].vip) == "10.96.0.20:9080"
    error = only_error(HEAD + '  vip: "reviews:9080"\n' + BACKENDS + "  routes:\n    - {name: a, to: [{backend: v1}]}\n")
    assert error.startswith("p.yaml:6:8: ") and "bad virtual address 'reviews:9080': expected IPV4:PORT" in error
