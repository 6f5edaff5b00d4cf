"""YAML → validated policy model, with every error located at FILE:LINE:COL.

A file may hold several Kubernetes-style documents separated by `---`. Loading is all or
nothing: `load_text` either returns a complete `PolicySet` or raises `PolicyInvalid` with
every error of the file, so a policy that fails validation can never be half-applied.

`FIELDS` is the single table of which fields each mapping accepts (and which are required),
`DEPRECATED` of the old names still read with a warning; the CRD schema generator reads both, so
the two cannot drift.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import yaml

from meshlet.policy import checks
from meshlet.policy.errors import PolicyError, PolicyInvalid, PolicyWarning
from meshlet.policy.model import (
    API_VERSION,
    BACKEND_PROTOCOLS,
    BACKEND_TLS,
    DATAPLANES,
    MTLS_MODES,
    RETRY_CONDITIONS,
    SELECTOR_OPERATORS,
    Analysis,
    Backend,
    LabelRequirement,
    LabelSelector,
    Mark,
    Match,
    Metadata,
    Mtls,
    PolicySet,
    QosClass,
    QoSPolicy,
    Retries,
    Rollout,
    Route,
    Slo,
    Sticky,
    StringMatch,
    TrafficPolicy,
    WeightedBackend,
)
from meshlet.policy.reader import Reader
from meshlet.policy.values import (
    parse_address,
    parse_duration,
    parse_label_value,
    parse_rate,
    parse_spiffe_id,
    parse_vip,
)

# Which fields each mapping accepts: name → required.
FIELDS: dict[str, dict[str, bool]] = {
    "document": {"apiVersion": True, "kind": True, "metadata": True, "spec": True},
    "metadata": {"name": True, "namespace": False, "labels": False, "annotations": False},
    "TrafficPolicy.spec": {
        "host": True, "dataplane": False, "backends": True, "routes": True, "mtls": False, "qos": False,
        "vip": False,
    },
    "backend": {"address": True, "tls": False, "identity": False, "protocol": False, "workload": False,
                "version": False},
    "route": {
        "name": True, "match": False, "to": True, "sticky": False, "timeout": False, "retries": False, "rollout": False,
    },
    "rollout": {
        "canary": True, "stable": True, "steps": True, "interval": False, "analysis": False, "failure_limit": False,
    },
    "analysis": {"success_rate": False, "p99": False, "min_requests": False},
    "analysis.success_rate": {"min": True},
    "analysis.p99": {"max": True},
    "match": {"headers": False, "cookies": False, "path": False, "method": False},
    "stringMatch": {"exact": False, "prefix": False, "regex": False},
    "target": {"backend": True, "weight": False},
    "sticky": {"header": False, "cookie": False, "source": False},
    "retries": {"attempts": True, "retryOn": False},
    "mtls": {"mode": False, "allow": False, "selector": False},
    "qos": {"class": True},
    "QoSPolicy.spec": {"interface": True, "classes": True, "nodeSelector": False},
    "qosClass": {"priority": True, "rate": True, "ceil": False, "ports": False, "slo": False, "podSelector": False},
    "slo": {"p99": True},
    "labelSelector": {"matchLabels": False, "matchExpressions": False},
    "labelRequirement": {"key": True, "operator": True, "values": False},
}
# Deprecated field names, still read: section → {old name: (new name, why it changed)}.
DEPRECATED: dict[str, dict[str, tuple[str, str]]] = {
    "retries": {"on": ("retryOn", "YAML 1.1 readers such as kubectl's read a bare `on:` key as the boolean true")},
}
KINDS: tuple[str, ...] = ("TrafficPolicy", "QoSPolicy")


def load_files(paths: Iterable[str | Path]) -> PolicySet:
    """Load several files as one set; errors of all files are reported together."""
    traffic: list[TrafficPolicy] = []
    qos: list[QoSPolicy] = []
    errors: list[PolicyError] = []
    warnings: list[PolicyWarning] = []
    for path in paths:
        try:
            loaded = load_file(path)
        except PolicyInvalid as e:
            errors.extend(e.errors)
            warnings.extend(e.warnings)
            continue
        traffic.extend(loaded.traffic)
        qos.extend(loaded.qos)
        warnings.extend(loaded.warnings)
    _raise_if(errors, warnings)
    policies = PolicySet(tuple(traffic), tuple(qos), tuple(warnings))
    _raise_if(checks.check_set(policies), warnings)
    return policies


def load_file(path: str | Path) -> PolicySet:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise PolicyInvalid([PolicyError(Mark(str(path), 1, 1), f"cannot read policy file: {reason}")]) from None
    return load_text(text, str(path))


def load_text(text: str, file: str = "<input>") -> PolicySet:
    """Parse and validate every document of one file. Raises PolicyInvalid with all errors."""
    reader = Reader(file)
    traffic: list[TrafficPolicy] = []
    qos: list[QoSPolicy] = []
    documents = 0
    try:
        for node in yaml.compose_all(text, Loader=yaml.SafeLoader):
            if node is None or (isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null")):
                continue  # an empty document, e.g. a trailing `---`
            documents += 1
            before = len(reader.errors)
            policy = _document(reader, node, f"document {documents}")
            if policy is None or len(reader.errors) > before:
                continue
            # Cross-field checks only on structurally sound documents: a field that failed to
            # parse would otherwise cascade into misleading follow-up errors.
            reader.errors.extend(checks.check_policy(policy))
            (traffic if isinstance(policy, TrafficPolicy) else qos).append(policy)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = " ".join(filter(None, [e.context, e.problem]))
        reader.error(Mark(file, line, column), f"malformed YAML: {problem}")
    except yaml.reader.ReaderError as e:  # a character YAML forbids, found before any parsing
        line = text.count("\n", 0, e.position) + 1
        column = e.position - (text.rfind("\n", 0, e.position) + 1) + 1
        reader.error(Mark(file, line, column), f"malformed YAML: unacceptable character #x{e.character:04x}")
    except yaml.YAMLError as e:
        reader.error(Mark(file, 1, 1), f"malformed YAML: {str(e).splitlines()[0]}")
    except RecursionError:
        reader.error(Mark(file, 1, 1), "malformed YAML: nesting too deep")
    if documents == 0 and not reader.errors:
        reader.error(Mark(file, 1, 1), "empty policy file: expected at least one TrafficPolicy or QoSPolicy document")
    warnings = sorted(reader.warnings, key=_position)
    _raise_if(sorted(reader.errors, key=_position), warnings)
    policies = PolicySet(tuple(traffic), tuple(qos), tuple(warnings))
    _raise_if(checks.check_set(policies), warnings)
    return policies


def _position(error: PolicyError) -> tuple[int, int]:
    return error.mark.line, error.mark.column


def _raise_if(errors: list[PolicyError], warnings: list[PolicyWarning]) -> None:
    if errors:
        raise PolicyInvalid(errors, warnings)


# -- documents -----------------------------------------------------------------------------------


def _document(r: Reader, node: yaml.Node, where: str) -> TrafficPolicy | QoSPolicy | None:
    doc = r.mapping(node, where, FIELDS["document"])
    if doc is None:
        return None
    if "apiVersion" in doc:
        api = r.string(doc["apiVersion"], "apiVersion")
        if api is not None and api != API_VERSION:
            r.error(doc["apiVersion"], f"apiVersion: {api!r} is not supported, use {API_VERSION!r}")
    kind = r.choice(doc["kind"], "kind", KINDS) if "kind" in doc else None
    metadata = _metadata(r, doc["metadata"]) if "metadata" in doc else None
    if kind is None or metadata is None or "spec" not in doc:
        return None
    where = f"{kind} {metadata.name!r}"
    if kind == "TrafficPolicy":
        return _traffic(r, doc["spec"], metadata, f"{where} spec")
    return _qos_policy(r, doc["spec"], metadata, f"{where} spec")


def _metadata(r: Reader, node: yaml.Node) -> Metadata | None:
    fields = r.mapping(node, "metadata", FIELDS["metadata"])
    if fields is None or "name" not in fields:
        return None
    name = r.string(fields["name"], "metadata.name")
    namespace = r.string(fields["namespace"], "metadata.namespace") if "namespace" in fields else "default"
    labels: list[tuple[str, str]] = []
    for key in ("labels", "annotations"):
        entries = r.entries(fields[key], f"metadata.{key}") if key in fields else None
        for name_, (_, value) in (entries or {}).items():
            text = r.string(value, f"metadata.{key}.{name_}", scalars_ok=True)
            if key == "labels" and text is not None:
                labels.append((name_, text))
    if name is None or namespace is None:
        return None
    return Metadata(name, namespace, tuple(labels), mark=r.mark(node))


# -- TrafficPolicy -------------------------------------------------------------------------------


def _traffic(r: Reader, node: yaml.Node, metadata: Metadata, where: str) -> TrafficPolicy | None:
    spec = r.mapping(node, where, FIELDS["TrafficPolicy.spec"])
    if spec is None:
        return None
    host = r.string(spec["host"], f"{where}.host") if "host" in spec else None
    dataplane = r.choice(spec["dataplane"], f"{where}.dataplane", DATAPLANES) if "dataplane" in spec else "proxy"
    backends = _backends(r, spec["backends"], f"{where}.backends") if "backends" in spec else None
    routes = _routes(r, spec["routes"], f"{where}.routes") if "routes" in spec else None
    mtls = _mtls(r, spec["mtls"], f"{where}.mtls") if "mtls" in spec else None
    qos_class = None
    if "qos" in spec:
        qos = r.mapping(spec["qos"], f"{where}.qos", FIELDS["qos"])
        qos_class = r.string(qos["class"], f"{where}.qos.class") if qos and "class" in qos else None
    vip = r.parsed(spec["vip"], f"{where}.vip", parse_vip) if "vip" in spec else None
    if host is None or dataplane is None or backends is None or routes is None:
        return None
    return TrafficPolicy(
        metadata=metadata, host=host, backends=backends, routes=routes,
        dataplane=dataplane, mtls=mtls, qos_class=qos_class, vip=vip, mark=r.mark(node),
    )


def _backends(r: Reader, node: yaml.Node, where: str) -> tuple[Backend, ...] | None:
    entries = r.entries(node, where)
    if entries is None:
        return None
    if not entries:
        r.error(node, f"{where}: at least one backend is required")
        return None
    out = []
    for name, (key_node, value) in entries.items():
        at = f"{where}.{name}"
        fields = r.mapping(value, at, FIELDS["backend"])
        if not r.identifier(key_node, name, where) or fields is None or "address" not in fields:
            continue
        address = r.parsed(fields["address"], f"{at}.address", parse_address)
        tls = r.choice(fields["tls"], f"{at}.tls", BACKEND_TLS) if "tls" in fields else "none"
        identity = r.parsed(fields["identity"], f"{at}.identity", parse_spiffe_id) if "identity" in fields else None
        protocol = r.choice(fields["protocol"], f"{at}.protocol", BACKEND_PROTOCOLS) if "protocol" in fields else "auto"
        workload = r.parsed(fields["workload"], f"{at}.workload", parse_label_value) if "workload" in fields else None
        version = r.parsed(fields["version"], f"{at}.version", parse_label_value, ints_ok=True) \
            if "version" in fields else None
        if address is not None and tls is not None and protocol is not None:
            out.append(Backend(name, address, tls, identity, protocol, workload or None, version or None,
                               mark=r.mark(key_node)))
    return tuple(out)


def _routes(r: Reader, node: yaml.Node, where: str) -> tuple[Route, ...] | None:
    items = r.sequence(node, where)
    if items is None:
        return None
    if not items:
        r.error(node, f"{where}: at least one route is required")
        return None
    routes = [_route(r, item, f"{where}[{i}]") for i, item in enumerate(items)]
    return tuple(route for route in routes if route is not None)


def _route(r: Reader, node: yaml.Node, where: str) -> Route | None:
    fields = r.mapping(node, where, FIELDS["route"])
    if fields is None:
        return None
    name = r.string(fields["name"], f"{where}.name") if "name" in fields else None
    if name is not None and not r.identifier(fields["name"], name, f"{where}.name"):
        name = None
    match = _match(r, fields["match"], f"{where}.match") if "match" in fields else None
    to = _targets(r, fields["to"], f"{where}.to") if "to" in fields else None
    sticky = _sticky(r, fields["sticky"], f"{where}.sticky") if "sticky" in fields else None
    timeout = None
    if "timeout" in fields:
        timeout = r.parsed(fields["timeout"], f"{where}.timeout", parse_duration, ints_ok=True)
    retries = _retries(r, fields["retries"], f"{where}.retries") if "retries" in fields else None
    rollout = _rollout(r, fields["rollout"], f"{where}.rollout") if "rollout" in fields else None
    if name is None or to is None:
        return None
    return Route(name, to, match, sticky, timeout, retries, rollout, mark=r.mark(node))


def _match(r: Reader, node: yaml.Node, where: str) -> Match | None:
    fields = r.mapping(node, where, FIELDS["match"])
    if fields is None:
        return None
    headers = _named_matches(r, fields["headers"], f"{where}.headers", lower=True) if "headers" in fields else ()
    cookies = _named_matches(r, fields["cookies"], f"{where}.cookies", lower=False) if "cookies" in fields else ()
    path = _string_match(r, fields["path"], f"{where}.path") if "path" in fields else None
    methods: tuple[str, ...] = ()
    if "method" in fields:
        method_node = fields["method"]
        if isinstance(method_node, yaml.SequenceNode):
            methods = tuple(m.upper() for _, m in r.string_list(method_node, f"{where}.method") or [])
        else:
            single = r.string(method_node, f"{where}.method")
            methods = (single.upper(),) if single else ()
    return Match(headers or (), cookies or (), path, methods, mark=r.mark(node))


def _named_matches(
    r: Reader, node: yaml.Node, where: str, *, lower: bool
) -> tuple[tuple[str, StringMatch], ...] | None:
    """`{x-group: beta}` (exact) or `{x-group: {regex: "b.*"}}`; header names are case-insensitive."""
    entries = r.entries(node, where)
    if entries is None:
        return None
    out = []
    for name, (_, value) in entries.items():
        at = f"{where}.{name}"
        if isinstance(value, yaml.MappingNode):
            matcher = _string_match(r, value, at)
        else:
            text = r.string(value, at, scalars_ok=True)
            matcher = StringMatch(exact=text, mark=r.mark(value)) if text is not None else None
        if matcher is not None:
            out.append((name.lower() if lower else name, matcher))
    return tuple(out)


def _string_match(r: Reader, node: yaml.Node, where: str) -> StringMatch | None:
    fields = r.mapping(node, where, FIELDS["stringMatch"])
    if fields is None:
        return None
    if len(fields) != 1:
        r.error(node, f"{where}: give exactly one of exact, prefix, regex")
        return None
    (kind, value_node), = fields.items()
    value = r.string(value_node, f"{where}.{kind}", scalars_ok=kind != "regex")
    if value is None:
        return None
    if kind == "regex":
        try:
            re.compile(value)
        except re.error as e:
            r.error(value_node, f"{where}.regex: invalid regular expression: {e}")
            return None
    return StringMatch(**{kind: value}, mark=r.mark(node))


def _targets(r: Reader, node: yaml.Node, where: str) -> tuple[WeightedBackend, ...] | None:
    items = r.sequence(node, where)
    if items is None:
        return None
    if not items:
        r.error(node, f"{where}: is empty; name at least one backend")
        return None
    out = []
    for i, item in enumerate(items):
        at = f"{where}[{i}]"
        fields = r.mapping(item, at, FIELDS["target"])
        if fields is None or "backend" not in fields:
            continue
        backend = r.string(fields["backend"], f"{at}.backend")
        if "weight" in fields:
            weight = r.integer(fields["weight"], f"{at}.weight", low=0, high=100)
        else:
            weight = 100 if len(items) == 1 else None
            if weight is None:
                r.error(item, f"{at}: missing 'weight' (required when a route splits across several backends)")
        if backend is not None and weight is not None:
            out.append(WeightedBackend(backend, weight, mark=r.mark(item)))
    if len(out) != len(items):
        return None
    return tuple(out)


def _sticky(r: Reader, node: yaml.Node, where: str) -> Sticky | None:
    fields = r.mapping(node, where, FIELDS["sticky"])
    if fields is None:
        return None
    if len(fields) != 1:
        r.error(node, f"{where}: give exactly one of header, cookie, source")
        return None
    (kind, value_node), = fields.items()
    if kind == "source":
        return Sticky(source_ip=True, mark=r.mark(node)) if r.choice(value_node, f"{where}.source", ("ip",)) else None
    value = r.string(value_node, f"{where}.{kind}")
    if value is None:
        return None
    if kind == "header":
        return Sticky(header=value.lower(), mark=r.mark(node))
    return Sticky(cookie=value, mark=r.mark(node))


def _retries(r: Reader, node: yaml.Node, where: str) -> Retries | None:
    fields = r.mapping(node, where, FIELDS["retries"], DEPRECATED["retries"])
    if fields is None or "attempts" not in fields:
        return None
    attempts = r.integer(fields["attempts"], f"{where}.attempts", low=1, high=10)
    on: tuple[str, ...] = ("connect-failure",)
    if "retryOn" in fields:
        at = f"{where}.retryOn"
        conditions = r.sequence(fields["retryOn"], at)
        if conditions is None:
            return None
        on = tuple(filter(None, (r.choice(c, f"{at}[{i}]", RETRY_CONDITIONS) for i, c in enumerate(conditions))))
        if len(on) != len(conditions):
            return None
    if attempts is None:
        return None
    return Retries(attempts, on, mark=r.mark(node))


def _rollout(r: Reader, node: yaml.Node, where: str) -> Rollout | None:
    fields = r.mapping(node, where, FIELDS["rollout"])
    if fields is None or not {"canary", "stable", "steps"} <= fields.keys():
        return None
    canary = r.string(fields["canary"], f"{where}.canary")
    stable = r.string(fields["stable"], f"{where}.stable")
    steps: list[int | None] = []
    for i, step in enumerate(r.sequence(fields["steps"], f"{where}.steps") or []):
        steps.append(r.integer(step, f"{where}.steps[{i}]", low=1, high=100))
    if not steps:
        r.error(fields["steps"], f"{where}.steps: give at least one canary weight, e.g. [5, 25, 50, 100]")
    interval = 30.0
    if "interval" in fields:
        interval = r.parsed(fields["interval"], f"{where}.interval", parse_duration, ints_ok=True)
    failure_limit = 2
    if "failure_limit" in fields:
        failure_limit = r.integer(fields["failure_limit"], f"{where}.failure_limit", low=1, high=100)
    analysis = _analysis(r, fields["analysis"], f"{where}.analysis") if "analysis" in fields else Analysis()
    if None in (canary, stable, interval, failure_limit, analysis) or None in steps or not steps:
        return None
    return Rollout(canary, stable, tuple(steps), interval, analysis, failure_limit, mark=r.mark(node))


def _analysis(r: Reader, node: yaml.Node, where: str) -> Analysis | None:
    fields = r.mapping(node, where, FIELDS["analysis"])
    if fields is None:
        return None
    errors_before = len(r.errors)
    min_success_rate = max_p99 = None
    if "success_rate" in fields:
        rate = r.mapping(fields["success_rate"], f"{where}.success_rate", FIELDS["analysis.success_rate"])
        if rate and "min" in rate:
            min_success_rate = r.number(rate["min"], f"{where}.success_rate.min", low=0, high=100)
    if "p99" in fields:
        p99 = r.mapping(fields["p99"], f"{where}.p99", FIELDS["analysis.p99"])
        if p99 and "max" in p99:
            max_p99 = r.parsed(p99["max"], f"{where}.p99.max", parse_duration, ints_ok=True)
    min_requests = 50
    if "min_requests" in fields:
        min_requests = r.integer(fields["min_requests"], f"{where}.min_requests", low=1)
    if len(r.errors) > errors_before or min_requests is None:
        return None
    return Analysis(min_success_rate, max_p99, min_requests, mark=r.mark(node))


def _mtls(r: Reader, node: yaml.Node, where: str) -> Mtls | None:
    fields = r.mapping(node, where, FIELDS["mtls"])
    if fields is None:
        return None
    mode = r.choice(fields["mode"], f"{where}.mode", MTLS_MODES) if "mode" in fields else "PERMISSIVE"
    allow: list[str] = []
    if "allow" in fields:
        for i, (item, _) in enumerate(r.string_list(fields["allow"], f"{where}.allow") or []):
            identity = r.parsed(item, f"{where}.allow[{i}]", parse_spiffe_id)
            if identity is not None:
                allow.append(identity)
    selector = _selector(r, fields["selector"], f"{where}.selector") if "selector" in fields else None
    if selector is not None and not (selector.match_labels or selector.match_expressions):
        r.error(fields["selector"], f"{where}.selector: name at least one label, or leave out the selector "
                "for the namespace's default")
        return None
    if mode is None or ("selector" in fields and selector is None):
        return None
    return Mtls(mode, tuple(allow), selector, mark=r.mark(node))


# -- QoSPolicy -----------------------------------------------------------------------------------


def _qos_policy(r: Reader, node: yaml.Node, metadata: Metadata, where: str) -> QoSPolicy | None:
    spec = r.mapping(node, where, FIELDS["QoSPolicy.spec"])
    if spec is None:
        return None
    interface = r.string(spec["interface"], f"{where}.interface") if "interface" in spec else None
    if interface is not None and (len(interface) > 15 or "/" in interface or " " in interface):
        r.error(spec["interface"], f"{where}.interface: {interface!r} is not a valid interface name")
    classes = _qos_classes(r, spec["classes"], f"{where}.classes") if "classes" in spec else None
    nodes = _selector(r, spec["nodeSelector"], f"{where}.nodeSelector") if "nodeSelector" in spec else None
    if interface is None or classes is None or ("nodeSelector" in spec and nodes is None):
        return None
    return QoSPolicy(metadata, interface, classes, nodes, mark=r.mark(node))


def _qos_classes(r: Reader, node: yaml.Node, where: str) -> tuple[QosClass, ...] | None:
    entries = r.entries(node, where)
    if entries is None:
        return None
    if not entries:
        r.error(node, f"{where}: at least one class is required")
        return None
    out = []
    for name, (key_node, value) in entries.items():
        at = f"{where}.{name}"
        fields = r.mapping(value, at, FIELDS["qosClass"])
        if not r.identifier(key_node, name, where) or fields is None:
            continue
        priority = r.integer(fields["priority"], f"{at}.priority", low=0, high=7) if "priority" in fields else None
        rate = r.parsed(fields["rate"], f"{at}.rate", parse_rate, ints_ok=True) if "rate" in fields else None
        ceil = r.parsed(fields["ceil"], f"{at}.ceil", parse_rate, ints_ok=True) if "ceil" in fields else rate
        ports: list[int] = []
        if "ports" in fields:
            for i, port_node in enumerate(r.sequence(fields["ports"], f"{at}.ports") or []):
                port = r.integer(port_node, f"{at}.ports[{i}]", low=1, high=65535)
                if port is not None:
                    ports.append(port)
        slo = None
        if "slo" in fields:
            slo_fields = r.mapping(fields["slo"], f"{at}.slo", FIELDS["slo"])
            if slo_fields and "p99" in slo_fields:
                p99 = r.parsed(slo_fields["p99"], f"{at}.slo.p99", parse_duration, ints_ok=True)
                slo = Slo(p99, mark=r.mark(fields["slo"])) if p99 is not None else None
        pods = _selector(r, fields["podSelector"], f"{at}.podSelector") if "podSelector" in fields else None
        if priority is None or rate is None or ceil is None or ("podSelector" in fields and pods is None):
            continue
        out.append(QosClass(name, priority, rate, ceil, tuple(ports), slo, pods, mark=r.mark(key_node)))
    return tuple(out)


def _selector(r: Reader, node: yaml.Node, where: str) -> LabelSelector | None:
    """A Kubernetes label selector: `{matchLabels: {tier: web}, matchExpressions: [{key, operator, values}]}`."""
    fields = r.mapping(node, where, FIELDS["labelSelector"])
    if fields is None:
        return None
    before = len(r.errors)
    entries = r.entries(fields["matchLabels"], f"{where}.matchLabels") if "matchLabels" in fields else None
    labels: list[tuple[str, str]] = []
    for key, (_, value) in (entries or {}).items():
        text = r.string(value, f"{where}.matchLabels.{key}", scalars_ok=True)
        if text is not None:
            labels.append((key, text))
    expressions = fields.get("matchExpressions")
    items = r.sequence(expressions, f"{where}.matchExpressions") if expressions is not None else None
    requirements = []
    for i, item in enumerate(items or []):
        requirement = _requirement(r, item, f"{where}.matchExpressions[{i}]")
        if requirement is not None:
            requirements.append(requirement)
    if len(r.errors) > before:
        return None
    return LabelSelector(tuple(labels), tuple(requirements), mark=r.mark(node))


def _requirement(r: Reader, node: yaml.Node, where: str) -> LabelRequirement | None:
    fields = r.mapping(node, where, FIELDS["labelRequirement"])
    if fields is None or not {"key", "operator"} <= fields.keys():
        return None
    key = r.string(fields["key"], f"{where}.key")
    operator = r.choice(fields["operator"], f"{where}.operator", SELECTOR_OPERATORS)
    values = [v for _, v in r.string_list(fields["values"], f"{where}.values") or []] if "values" in fields else []
    if key is None or operator is None:
        return None
    if operator in ("In", "NotIn") and not values:
        r.error(node, f"{where}: operator {operator} needs values")
        return None
    if operator in ("Exists", "DoesNotExist") and values:
        r.error(fields["values"], f"{where}: operator {operator} takes no values")
        return None
    return LabelRequirement(key, operator, tuple(values), mark=r.mark(node))
