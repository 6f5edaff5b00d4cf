"""The CRDs are generated from the policy model and the loader's FIELDS, and cannot drift.

No API server runs here, so the CRD's OpenAPI schema is checked with `jsonschema`, after
translating the two Kubernetes extensions it uses and rejecting unknown fields as
`kubectl apply --validate=strict` does. The loader is the reference: for values at and past
every bound, the schema must accept exactly what the loader accepts.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from meshlet.k8s import crd
from meshlet.k8s.manifest import Yaml12Loader
from meshlet.policy import PolicyInvalid, load, load_text

REPO = Path(__file__).parents[3]
CRDS = REPO / "helm" / "meshlet" / "crds"
POLICIES = sorted((REPO / "policies").glob("*.yaml"))


def load_all(text: str) -> list[dict]:
    return list(yaml.load_all(text, Loader=Yaml12Loader))


EXCLUSIVE = re.compile(r"!\(has\(self\.(\w+)\) && has\(self\.(\w+)\)\)")


def to_jsonschema(node: object) -> object:
    if isinstance(node, list):
        return [to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_jsonschema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string"):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    for check in node.get("x-kubernetes-validations", []):  # CEL: only the rule the generator writes
        exclusive = EXCLUSIVE.fullmatch(check["rule"])
        assert exclusive, f"no translation of CEL rule {check['rule']!r}: add one here"
        out["not"] = {"required": list(exclusive.groups())}
    if "properties" in node and "additionalProperties" not in node:
        out["additionalProperties"] = False
    return out


def validator(kind: str) -> jsonschema.Validator:
    doc = yaml.safe_load((CRDS / f"{crd.crd(kind)['metadata']['name']}.yaml").read_text())
    schema = to_jsonschema(doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


def schema_accepts(doc: dict) -> bool:
    return validator(doc["kind"]).is_valid(doc)


def loader_accepts(doc: dict) -> bool:
    try:
        load_text(json.dumps(doc))  # JSON is YAML; no key can turn into a boolean
    except PolicyInvalid:
        return False
    return True


def test_committed_crds_are_up_to_date():
    assert crd.main(["--check", str(CRDS)]) == 0, "run: python -m meshlet.k8s.crd helm/meshlet/crds"


def test_every_model_attribute_is_settable_from_yaml():
    assert crd.check_coverage() == []


@pytest.mark.parametrize("path", sorted(CRDS.glob("*.yaml")), ids=lambda p: p.name)
def test_crds_pass_strict_kubernetes_schema(path):
    kubernetes_validate.validate(yaml.safe_load(path.read_text()), kubernetes_validate.latest_version(), strict=True)


def _property_names(node: object) -> set[str]:
    if isinstance(node, list):
        return set().union(*map(_property_names, node)) if node else set()
    if not isinstance(node, dict):
        return set()
    names = set(node.get("properties", {})) if isinstance(node.get("properties"), dict) else set()
    return names.union(*map(_property_names, node.values()))


def test_every_loader_field_appears_in_the_schema():
    names = set().union(*(_property_names(yaml.safe_load(p.read_text())) for p in CRDS.glob("*.yaml")))
    for section, fields in load.FIELDS.items():
        if section in crd.ENVELOPE:
            continue
        for field in fields:
            assert field in names, f"{section}.{field} missing from the CRDs"


@pytest.mark.parametrize("path", POLICIES, ids=lambda p: p.name)
def test_schema_accepts_every_example_policy(path):
    for doc in load_all(path.read_text()):
        errors = [e.message for e in validator(doc["kind"]).iter_errors(doc)]
        assert errors == []


CANARY = load_all((REPO / "policies" / "canary.yaml").read_text())[0]
QOS = load_all((REPO / "policies" / "qos.yaml").read_text())[0]


def _set(doc: dict, path: str, value: object) -> dict:
    doc = copy.deepcopy(doc)
    *parents, last = path.split(".")
    node = doc
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return doc


def _weights(w: object, rest: object) -> dict:
    return _set(CANARY, "spec.routes.0.to", [{"backend": "v1", "weight": w}, {"backend": "v2", "weight": rest}])


CASES = [
    ("weight 0", _weights(0, 100), True),
    ("weight 100", _weights(100, 0), True),
    ("weight 150", _weights(150, -50), False),
    ("weight -1", _weights(-1, 101), False),
    ("weight 'ten'", _weights("ten", 90), False),
    ("weight 10.5", _weights(10.5, 89.5), False),
    ("attempts 10", _set(CANARY, "spec.routes.0.retries.attempts", 10), True),
    ("attempts 11", _set(CANARY, "spec.routes.0.retries.attempts", 11), False),
    ("attempts 0", _set(CANARY, "spec.routes.0.retries.attempts", 0), False),
    ("retryOn typo", _set(CANARY, "spec.routes.0.retries.retryOn", ["5xxx"]), False),
    ("retryOn gRPC", _set(CANARY, "spec.routes.0.retries.retryOn", ["unavailable", "deadline-exceeded"]), True),
    ("deprecated on", _set(CANARY, "spec.routes.0.retries", {"attempts": 2, "on": ["5xx"]}), True),
    ("retryOn and on", _set(CANARY, "spec.routes.0.retries.on", ["5xx"]), False),
    ("protocol http2", _set(CANARY, "spec.backends.v1.protocol", "http2"), True),
    ("protocol h2", _set(CANARY, "spec.backends.v1.protocol", "h2"), False),
    ("timeout 150ms", _set(CANARY, "spec.routes.0.timeout", "150ms"), True),
    ("timeout 1m30s", _set(CANARY, "spec.routes.0.timeout", "1m30s"), True),
    ("timeout 2 (no unit)", _set(CANARY, "spec.routes.0.timeout", "2"), False),
    ("timeout 2x", _set(CANARY, "spec.routes.0.timeout", "2x"), False),
    ("dataplane kernel", _set(_set(CANARY, "spec.routes.0.retries", None), "spec.dataplane", "kernel"), None),
    ("dataplane Kernel", _set(CANARY, "spec.dataplane", "Kernel"), False),
    ("tls MESH", _set(CANARY, "spec.backends.v1.tls", "MESH"), False),
    ("unknown backend field", _set(CANARY, "spec.backends.v1.weight", 3), False),
    ("unknown spec field", _set(CANARY, "spec.hosts", ["a"]), False),
    ("no backends", _set(CANARY, "spec.backends", {}), False),
    ("no routes", _set(CANARY, "spec.routes", []), False),
    ("sticky two keys", _set(CANARY, "spec.routes.0.sticky", {"header": "x", "cookie": "y"}), False),
    ("sticky source ip", _set(CANARY, "spec.routes.0.sticky", {"source": "ip"}), True),
    ("sticky source port", _set(CANARY, "spec.routes.0.sticky", {"source": "port"}), False),
    ("rollout", _set(CANARY, "spec.routes.0.rollout", {"canary": "v2", "stable": "v1", "steps": [10, 50, 100],
                                                        "interval": "30s", "analysis": {"p99": {"max": "250ms"}}}),
     True),
    ("rollout step 101", _set(CANARY, "spec.routes.0.rollout", {"canary": "v2", "stable": "v1", "steps": [101]}), False),
    ("rollout no steps", _set(CANARY, "spec.routes.0.rollout", {"canary": "v2", "stable": "v1", "steps": []}), False),
    ("priority 7", _set(QOS, "spec.classes.bulk.priority", 7), True),
    ("priority 8", _set(QOS, "spec.classes.bulk.priority", 8), False),
    ("port 65535", _set(QOS, "spec.classes.bulk.ports", [65535]), True),
    ("port 0", _set(QOS, "spec.classes.bulk.ports", [0]), False),
    ("port 65536", _set(QOS, "spec.classes.bulk.ports", [65536]), False),
    ("rate as bits", _set(QOS, "spec.classes.bulk.rate", 1000000), True),
    ("slo 50ms", _set(QOS, "spec.classes.bulk.slo", {"p99": "50ms"}), True),
    ("slo missing p99", _set(QOS, "spec.classes.bulk.slo", {}), False),
]


@pytest.mark.parametrize(("doc", "accepted"), [(d, a) for _, d, a in CASES], ids=[c[0] for c in CASES])
def test_schema_and_loader_agree(doc, accepted):
    """`accepted` None: only agreement matters (a cross-field rule may decide the loader's answer)."""
    loader = loader_accepts(doc)
    assert schema_accepts(doc) == loader or (not loader and accepted is None)
    if accepted is not None:
        assert loader == accepted


def test_a_loader_field_without_a_binding_fails_generation(monkeypatch):
    monkeypatch.setitem(load.FIELDS, "route", {**load.FIELDS["route"], "mirror": False})
    with pytest.raises(crd.DriftError, match=r"route\.mirror fills no attribute of Route"):
        crd.render()


def test_a_new_loader_section_without_a_binding_fails_generation(monkeypatch):
    monkeypatch.setitem(load.FIELDS, "fault", {"delay": False})
    with pytest.raises(crd.DriftError, match="loader section 'fault' is not bound"):
        crd.render()


def test_a_model_attribute_the_loader_cannot_set_is_reported(monkeypatch):
    monkeypatch.setitem(load.FIELDS, "retries", {"attempts": True})
    assert crd.check_coverage() == ["Retries.on"]
    with pytest.raises(crd.DriftError, match=r"Retries\.on"):
        crd.render()
