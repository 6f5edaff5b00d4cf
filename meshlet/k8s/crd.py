"""CustomResourceDefinitions for TrafficPolicy and QoSPolicy, generated from the policy model.

One source of truth: field names and which are required come from the loader's `FIELDS`
table; types come from the model dataclasses' annotations. This module only adds what
neither can say: how a parsed value is written in YAML (`2s` for a float of seconds), the
numeric bounds the loader enforces, and which model attribute a YAML field fills. A field
added to the loader or the model without a binding here makes generation fail, and a test
compares the generated files with the ones in helm/meshlet/crds/.

    python -m meshlet.k8s.crd helm/meshlet/crds           # regenerate
    python -m meshlet.k8s.crd --check helm/meshlet/crds   # exit 1 if stale
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from pathlib import Path

from meshlet.policy import load, model
from meshlet.policy.model import API_VERSION

GROUP, VERSION = API_VERSION.split("/")

# Loader section → the model class its fields fill.
SECTIONS: dict[str, type] = {
    "TrafficPolicy.spec": model.TrafficPolicy,
    "backend": model.Backend,
    "route": model.Route,
    "rollout": model.Rollout,
    "analysis": model.Analysis,
    "analysis.success_rate": model.Analysis,
    "analysis.p99": model.Analysis,
    "match": model.Match,
    "stringMatch": model.StringMatch,
    "target": model.WeightedBackend,
    "sticky": model.Sticky,
    "retries": model.Retries,
    "mtls": model.Mtls,
    "qos": model.TrafficPolicy,
    "QoSPolicy.spec": model.QoSPolicy,
    "qosClass": model.QosClass,
    "slo": model.Slo,
    "labelSelector": model.LabelSelector,
    "labelRequirement": model.LabelRequirement,
}
# Sections that are not the spec of a policy but Kubernetes' own envelope.
ENVELOPE = ("document", "metadata")

# YAML field → model attribute, where the names differ.
RENAMED: dict[tuple[str, str], str] = {
    ("qos", "class"): "qos_class",
    ("match", "method"): "methods",
    ("sticky", "source"): "source_ip",
    ("analysis.success_rate", "min"): "min_success_rate",
    ("analysis.p99", "max"): "max_p99",
    ("retries", "retryOn"): "on",
    ("qosClass", "podSelector"): "pod_selector",
    ("QoSPolicy.spec", "nodeSelector"): "node_selector",
    ("labelSelector", "matchLabels"): "match_labels",
    ("labelSelector", "matchExpressions"): "match_expressions",
}
# YAML mappings that fold into their parent's class: field → the section describing them.
NESTED: dict[tuple[str, str], str] = {
    ("TrafficPolicy.spec", "qos"): "qos",
    ("analysis", "success_rate"): "analysis.success_rate",
    ("analysis", "p99"): "analysis.p99",
}

_DURATION = {"type": "string", "pattern": r"^(\d+(\.\d+)?(ms|s|m|h))+$", "description": "e.g. 2s, 150ms, 1m30s"}
_SPIFFE = {"type": "string", "pattern": "^spiffe://[a-z0-9._-]+/.+$"}
_LOOSE = {"x-kubernetes-preserve-unknown-fields": True}
# How values that the loader parses are written (replaces the type derived from the model).
FORMS: dict[tuple[str, str], dict] = {
    ("backend", "address"): {"type": "string", "minLength": 3, "description": "HOST:PORT or [IPv6]:PORT"},
    ("TrafficPolicy.spec", "vip"): {"type": "string", "minLength": 9, "description": "IPV4:PORT a kernel split takes"},
    ("backend", "identity"): _SPIFFE,
    ("mtls", "allow"): {"type": "array", "items": _SPIFFE},
    ("route", "timeout"): _DURATION,
    ("rollout", "interval"): _DURATION,
    ("analysis.p99", "max"): _DURATION,
    ("analysis.success_rate", "min"): {"type": "number", "minimum": 0, "maximum": 100},
    ("slo", "p99"): _DURATION,
    ("qosClass", "rate"): {"x-kubernetes-int-or-string": True, "description": "bits/s or tc units: 50mbit"},
    ("qosClass", "ceil"): {"x-kubernetes-int-or-string": True, "description": "bits/s or tc units: 100mbit"},
    ("sticky", "source"): {"type": "string", "enum": ["ip"]},
    ("stringMatch", "exact"): {"type": "string"},  # the loader takes "" and numbers as written here
    ("stringMatch", "prefix"): {"type": "string"},
    # A value or a {exact|prefix|regex} mapping; one method or a list: the loader checks these.
    ("match", "headers"): {"type": "object", "additionalProperties": _LOOSE},
    ("match", "cookies"): {"type": "object", "additionalProperties": _LOOSE},
    ("match", "method"): _LOOSE,
    ("labelSelector", "matchLabels"): {"type": "object", "additionalProperties": {"type": "string"}},
}
# Bounds the loader enforces, merged into the derived schema; (section, "") is the mapping itself.
BOUNDS: dict[tuple[str, str], dict] = {
    ("target", "weight"): {"minimum": 0, "maximum": 100},
    ("retries", "attempts"): {"minimum": 1, "maximum": 10},
    ("rollout", "steps"): {"minItems": 1, "items": {"minimum": 1, "maximum": 100}},
    ("rollout", "failure_limit"): {"minimum": 1, "maximum": 100},
    ("analysis", "min_requests"): {"minimum": 1},
    ("qosClass", "priority"): {"minimum": 0, "maximum": 7},
    ("qosClass", "ports"): {"items": {"minimum": 1, "maximum": 65535}},
    ("TrafficPolicy.spec", "backends"): {"minProperties": 1},
    ("TrafficPolicy.spec", "routes"): {"minItems": 1},
    ("route", "to"): {"minItems": 1},
    ("QoSPolicy.spec", "classes"): {"minProperties": 1},
    ("stringMatch", ""): {"minProperties": 1, "maxProperties": 1},
    ("sticky", ""): {"minProperties": 1, "maxProperties": 1},
}
_SKIPPED_ATTRIBUTES = frozenset({"mark", "metadata"})


class DriftError(Exception):
    """The loader's fields, the model and this module's bindings no longer agree."""


def attribute(section: str, field: str) -> str:
    return RENAMED.get((section, field), field)


def keyed_by_name(section: str) -> bool:
    """Backends and QoS classes are written as a map whose keys are the model's `name`."""
    names = {f.name for f in dataclasses.fields(SECTIONS[section])}
    return "name" in names and "name" not in load.FIELDS[section]


def _primary_section(cls: type) -> str:
    for section, bound in SECTIONS.items():
        if bound is cls:
            return section
    raise DriftError(f"model class {cls.__name__} is used by a field but no loader section is bound to it")


def object_schema(section: str) -> dict:
    if section not in load.FIELDS:
        raise DriftError(f"section {section!r} is bound here but the loader has no such FIELDS entry")
    fields = load.FIELDS[section]
    properties = {name: field_schema(section, name) for name in fields}
    schema: dict = {"type": "object", "properties": properties}
    required = [name for name, needed in fields.items() if needed]
    if required:
        schema["required"] = required
    # Deprecated names stay in the schema: the API server prunes fields it does not know, and
    # would silently drop them from resources written before the rename.
    rules = []
    for old, (new, why) in load.DEPRECATED.get(section, {}).items():
        properties[old] = {**properties[new], "description": f"deprecated: write {new} ({why})"}
        rules.append({"rule": f"!(has(self.{old}) && has(self.{new}))",
                      "message": f"give {new} only, not also {old} (its deprecated old name)"})
    if rules:
        schema["x-kubernetes-validations"] = rules
    return _merge(schema, BOUNDS.get((section, ""), {}))


def field_schema(section: str, field: str) -> dict:
    if (section, field) in NESTED:
        return object_schema(NESTED[section, field])
    cls = SECTIONS[section]
    hints = typing.get_type_hints(cls)
    name = attribute(section, field)
    if name not in hints:
        raise DriftError(f"loader field {section}.{field} fills no attribute of {cls.__name__} (looked for {name!r})")
    if (section, field) in FORMS:
        schema = dict(FORMS[section, field])
    else:
        schema = _type_schema(hints[name], f"{section}.{field}")
    return _merge(schema, BOUNDS.get((section, field), {}))


def _type_schema(hint: object, where: str) -> dict:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        present = [a for a in args if a is not type(None)]
        if len(present) != 1:
            raise DriftError(f"{where}: union {hint} has no schema; add it to FORMS")
        return _type_schema(present[0], where)
    if origin is typing.Literal:
        return {"type": "string", "enum": list(args)}
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        item = args[0]
        if dataclasses.is_dataclass(item) and keyed_by_name(_primary_section(item)):
            return {"type": "object", "additionalProperties": object_schema(_primary_section(item))}
        return {"type": "array", "items": _type_schema(item, where)}
    if dataclasses.is_dataclass(hint):
        return object_schema(_primary_section(hint))
    if hint is str:
        return {"type": "string", "minLength": 1}
    if hint is int:
        return {"type": "integer"}
    # float (seconds? percent?), bool, Address: the YAML form is not the model's type.
    raise DriftError(f"{where}: model type {getattr(hint, '__name__', hint)} needs its YAML form in FORMS")


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def check_coverage() -> list[str]:
    """Model attributes no loader field fills: a field the YAML cannot set, or a missing binding."""
    filled: dict[type, set[str]] = {}
    for section, fields in load.FIELDS.items():
        if section in ENVELOPE:
            continue
        if section not in SECTIONS:
            raise DriftError(f"loader section {section!r} is not bound to a model class in meshlet.k8s.crd")
        filled.setdefault(SECTIONS[section], set()).update(attribute(section, f) for f in fields)
    missing = []
    for cls, names in filled.items():
        for f in dataclasses.fields(cls):
            if f.name in _SKIPPED_ATTRIBUTES or f.name in names:
                continue
            if f.name == "name" and any(keyed_by_name(s) for s, c in SECTIONS.items() if c is cls):
                continue
            missing.append(f"{cls.__name__}.{f.name}")
    return missing


_CONDITION = {
    "type": "object",
    "required": ["type", "status"],
    "properties": {
        "type": {"type": "string"},
        "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
        "reason": {"type": "string"},
        "message": {"type": "string"},
        "observedGeneration": {"type": "integer"},
        "lastTransitionTime": {"type": "string", "format": "date-time"},
    },
}


def crd(kind: str) -> dict:
    """The CustomResourceDefinition of one policy kind, as a plain dict."""
    plural = kind.lower() + "s" if not kind.endswith("y") else kind.lower()[:-1] + "ies"
    spec_section = f"{kind}.spec"
    printer = [{"name": "Host", "type": "string", "jsonPath": ".spec.host"},
               {"name": "Dataplane", "type": "string", "jsonPath": ".spec.dataplane"}] if kind == "TrafficPolicy" \
        else [{"name": "Interface", "type": "string", "jsonPath": ".spec.interface"}]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}", "labels": {"app.kubernetes.io/part-of": "meshlet"}},
        "spec": {
            "group": GROUP,
            # Traffic policies belong to a workload's namespace; QoS is per node, cluster-wide.
            "scope": "Namespaced" if kind == "TrafficPolicy" else "Cluster",
            "names": {
                "kind": kind, "listKind": f"{kind}List", "plural": plural, "singular": kind.lower(),
                "shortNames": ["tp" if kind == "TrafficPolicy" else "qosp"], "categories": ["meshlet"],
            },
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    *printer,
                    {"name": "Ready", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Ready\")].status"},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                ],
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": f"meshlet {kind}: the format `meshlet validate` checks, from the policy model.",
                    "required": ["spec"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": object_schema(spec_section),
                        "status": {"type": "object", "properties": {
                            "observedGeneration": {"type": "integer"},
                            "conditions": {"type": "array", "items": _CONDITION, "x-kubernetes-list-type": "map",
                                           "x-kubernetes-list-map-keys": ["type"]},
                        }},
                    },
                }},
            }],
        },
    }


def render() -> dict[str, str]:
    """File name → YAML text, for every policy kind."""
    from meshlet.k8s.manifest import dump

    missing = check_coverage()
    if missing:
        raise DriftError(f"model attributes no loader field sets: {', '.join(missing)}")
    header = "# Generated by `python -m meshlet.k8s.crd helm/meshlet/crds` from the policy model; do not edit.\n"
    out = {}
    for kind in load.KINDS:
        doc = crd(kind)
        out[f"{doc['metadata']['name']}.yaml"] = header + dump(doc)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshlet.k8s.crd", description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, help="where the CRD files go (helm/meshlet/crds)")
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if a file is stale")
    args = parser.parse_args(argv)
    try:
        files = render()
    except DriftError as e:
        print(f"crd: {e}", file=sys.stderr)
        return 1
    stale = [name for name, text in files.items()
             if not (args.directory / name).is_file() or (args.directory / name).read_text() != text]
    if args.check:
        for name in stale:
            print(f"crd: {args.directory / name} is stale; run python -m meshlet.k8s.crd {args.directory}",
                  file=sys.stderr)
        return 1 if stale else 0
    args.directory.mkdir(parents=True, exist_ok=True)
    for name in stale:
        (args.directory / name).write_text(files[name])
        print(f"crd: wrote {args.directory / name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
