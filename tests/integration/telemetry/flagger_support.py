"""Flagger's built-in Istio queries, verbatim, and the way Flagger renders and runs them.

Source: github.com/fluxcd/flagger at commit 15bd6ad555e6c935da55f0ab95977be74c149bd6,
`pkg/metrics/observers/istio.go` (`istioQueries`: tabs kept, upstream's trailing spaces as escapes),
rendered by `pkg/metrics/observers/render.go` (`RenderQuery`: Go text/template whose only
actions are the model's zero-argument functions of `pkg/apis/flagger/v1beta1/metric.go`,
`MetricTemplateModel.TemplateFunctions`) and sent by `pkg/metrics/providers/prometheus.go`
(`RunQuery`: `trimQuery` turns every run of whitespace into one space; the value is the last
sample of the result; no sample or NaN is `ErrNoValuesFound`).

A change to these texts is a change to what Flagger users get: copy them again from upstream.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from prometheus_support import Prometheus

FLAGGER_COMMIT = "15bd6ad555e6c935da55f0ab95977be74c149bd6"

REQUEST_SUCCESS_RATE = """
\tsum(
\t\trate(
\t\t\tistio_requests_total{
\t\t\t\treporter="destination",
\t\t\t\tdestination_workload_namespace="{{ namespace }}",
\t\t\t\tdestination_workload=~"{{ target }}",
\t\t\t\tresponse_code!~"5.*"
\t\t\t}[{{ interval }}]
\t\t)
\t)\x20
\t/\x20
\tsum(
\t\trate(
\t\t\tistio_requests_total{
\t\t\t\treporter="destination",
\t\t\t\tdestination_workload_namespace="{{ namespace }}",
\t\t\t\tdestination_workload=~"{{ target }}"
\t\t\t}[{{ interval }}]
\t\t)
\t)\x20
\t* 100"""

REQUEST_DURATION = """
\thistogram_quantile(
\t\t0.99,
\t\tsum(
\t\t\trate(
\t\t\t\tistio_request_duration_milliseconds_bucket{
\t\t\t\t\treporter="destination",
\t\t\t\t\tdestination_workload_namespace="{{ namespace }}",
\t\t\t\t\tdestination_workload=~"{{ target }}"
\t\t\t\t}[{{ interval }}]
\t\t\t)
\t\t) by (le)
\t)"""

ISTIO_QUERIES = {"request-success-rate": REQUEST_SUCCESS_RATE, "request-duration": REQUEST_DURATION}

_ACTION = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)


@dataclass(frozen=True)
class MetricTemplateModel:
    """Flagger's `toMetricModel(canary, metric.Interval, ...)`: target is the Canary's targetRef
    name (the Deployment), service defaults to it, interval is the analysis metric's."""

    name: str
    namespace: str
    target: str
    interval: str
    service: str = ""
    ingress: str = ""
    route: str = ""
    variables: dict[str, str] = field(default_factory=dict)

    def function(self, name: str, key: str | None = None) -> str:
        """The value of `{{ name }}` or `{{ variables.key }}`; an unknown name or key is a template
        error, as in Go with missingkey=error."""
        if name == "variables" and key is not None:
            if key not in self.variables:
                raise ValueError(f'template: tmpl: map has no entry for key "{key}"')
            return self.variables[key]
        if key is not None or name not in ("name", "namespace", "target", "service", "ingress", "route", "interval"):
            raise ValueError(f'template: tmpl: function "{name}" not defined')
        return getattr(self, name) or (self.target if name in ("service", "ingress", "route") else "")


def render(template: str, model: MetricTemplateModel) -> str:
    """`RenderQuery`: each `{{ fn }}` or `{{ variables.key }}` action replaced by the model's value;
    nothing else changes. Other template syntax is refused rather than guessed."""

    def action(match: re.Match[str]) -> str:
        found = re.fullmatch(r"\s*([A-Za-z_]\w*)(?:\.(\w+))?\s*", match.group(1))
        if not found:
            raise ValueError(f"this renderer supports only Flagger's model functions, not {{{{{match.group(1)}}}}}")
        return model.function(*found.groups())

    return _ACTION.sub(action, template)


def trim(query: str) -> str:
    """`trimQuery`: what Flagger actually sends to Prometheus."""
    return re.sub(r"\s+", " ", query)


class NoValuesFound(LookupError):
    """Flagger's `ErrNoValuesFound`: the query ran and answered no sample (or NaN)."""


def run_query(prometheus: Prometheus, query: str, at: float | None = None) -> float:
    """`RunQuery`: the trimmed text as an instant query; `at` pins the evaluation time (Flagger: now)."""
    value: float | None = None
    for sample in prometheus.instant(trim(query), at):
        if "values" in sample:
            raise ValueError("query returned multiple values")  # ErrMultipleValuesReturned
        value = float(sample["value"][1])
    if value is None or math.isnan(value):
        raise NoValuesFound(trim(query))
    return value
