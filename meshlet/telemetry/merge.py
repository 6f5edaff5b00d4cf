"""The app's metrics merged into the sidecar's scrape page, as Istio's pilot-agent does it.

Injection moves a Pod's `prometheus.io/*` annotations (the app's own scrape target) into the
sidecar's `--app-metrics` flag and points them at the sidecar's health port; the health port's
`/metrics` then serves the sidecar's page followed by the app's. Istio concatenates the two
bodies as they are ("assuming the application is not exposing the same metrics as Envoy"); here
the app's page is parsed and written again, because concatenation lets one bad line or one
shared name fail the whole scrape, and then Prometheus loses the sidecar's series too.

Who wins a name both pages use: **the sidecar**. Its page is passed through untouched and an
app family that would repeat one of its names (a `# TYPE` line or a sample name) is left out.
Names starting with `meshlet_` or `istio_` are the mesh's even when the sidecar has not
written them yet: an app cannot forge the series that rollouts, Flagger and the dashboards
judge it by. The sidecar's registry has no process_*/python_* collectors, so the app's
prometheus_client defaults (process_*, python_*, ...) arrive as the app wrote them. Nothing
is left out silently: the page carries how many families were left out
(`meshlet_app_metrics_dropped_families`), whether the app's page was merged at all
(`meshlet_app_metrics_up`) and why not (`meshlet_app_metrics_scrape_errors_total{reason}`),
and the sidecar logs it (meshlet.proxy.appmetrics).

The app may answer in the text format (0.0.4) or in OpenMetrics; anything that is not
OpenMetrics is read as text, as Prometheus 2 and Istio read it (Bookinfo's productpage
answers its metrics as `text/html`). The merged page is always the text format. A page that
does not parse, uses a name Prometheus refuses, or declares one name twice is refused whole
(reason `invalid`): Prometheus would refuse it too, and with it the sidecar's series.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text
from prometheus_client.registry import Collector

RESERVED_PREFIXES: tuple[str, ...] = ("meshlet_", "istio_")
OPENMETRICS = "application/openmetrics-text"
# What the sidecar asks the app for: the format it writes back (OpenMetrics is read all the same).
ACCEPT = "text/plain;version=0.0.4;q=1,application/openmetrics-text;version=1.0.0;q=0.5,*/*;q=0.1"
# Why the app's page is not in the merged page (the `reason` label).
REASONS: tuple[str, ...] = ("connect", "timeout", "status", "too_large", "invalid")

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
# How prometheus_client's text writer names a family in its `# TYPE` line.
_TYPE_SUFFIX = {"counter": "_total", "info": "_info"}


class InvalidPage(ValueError):
    """The app's page is not an exposition Prometheus would accept."""


def parse(body: bytes, content_type: str) -> list[Metric]:
    """The app's families; InvalidPage says what is wrong (for the sidecar's log, never a label)."""
    try:
        text = body.decode("utf-8")
        reader = parse_openmetrics if content_type.split(";")[0].strip().lower() == OPENMETRICS else parse_text
        families = list(reader(text))
    except (ValueError, TypeError, IndexError, KeyError) as e:  # the parsers raise more than ValueError
        raise InvalidPage(f"not a Prometheus exposition: {str(e)[:120]!r}") from None
    for family in families:
        for name in exposed_names(family):
            if not _METRIC_NAME.fullmatch(name):
                raise InvalidPage(f"metric name {name[:64]!r} is not one Prometheus accepts")
        for sample in family.samples:
            bad = next((label for label in sample.labels if not _LABEL_NAME.fullmatch(label)), None)
            if bad is not None:
                raise InvalidPage(f"label name {bad[:64]!r} of {sample.name} is not one Prometheus accepts")
    return families


def type_name(family: Metric) -> str:
    return family.name + _TYPE_SUFFIX.get(family.type, "")


def exposed_names(family: Metric) -> set[str]:
    """Every name this family takes in the text format: its `# TYPE` name and its samples'."""
    return {type_name(family), *(sample.name for sample in family.samples)}


def page_names(page: bytes) -> set[str]:
    """The names a text-format page (the sidecar's own) takes: `# TYPE` names and sample names."""
    names: set[str] = set()
    for line in page.split(b"\n"):
        if line.startswith(b"# TYPE "):
            names.add(line[7:].split(b" ", 1)[0].decode())
        elif line and not line.startswith(b"#"):
            names.add(re.split(rb"[{ ]", line, maxsplit=1)[0].decode())
    return names


@dataclass(frozen=True, slots=True)
class Merged:
    families: list[Metric]  # the app's families that go into the page
    dropped: list[str]  # the `# TYPE` names of the app's families left out: the sidecar's


def merge(sidecar_names: set[str], app: Iterable[Metric]) -> Merged:
    """Keep the app's families that take no name of the sidecar's or the mesh's (see the module
    docstring); a family repeated in the app's page is joined to its first appearance when it
    has the same type, and InvalidPage otherwise."""
    kept: dict[str, Metric] = {}  # by `# TYPE` name
    taken: dict[str, str] = {}  # each name a kept family takes → that family's `# TYPE` name
    dropped: list[str] = []
    for family in app:
        names = exposed_names(family)
        if names & sidecar_names or any(name.startswith(RESERVED_PREFIXES) for name in names):
            dropped.append(type_name(family))
            continue
        key = type_name(family)
        clash = next((name for name in sorted(names) if taken.get(name, key) != key), None)
        first = kept.get(key)
        if clash is not None or (first is not None and first.type != family.type):
            raise InvalidPage(f"the page declares {clash or key} twice")
        if first is not None:
            first.samples.extend(family.samples)
        else:
            kept[key] = family
        taken.update(dict.fromkeys(names, key))
    return Merged(list(kept.values()), dropped)


class _Families(Collector):
    """Parsed families, for `generate_latest` to write."""

    def __init__(self, families: Iterable[Metric]):
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


def render(families: Iterable[Metric]) -> bytes:
    return generate_latest(_Families(families))


@dataclass
class ScrapeStats:
    """How merging the app's page went: families written into the merged page itself (the sidecar's
    own names), so the page that lacks the app's series says why. Kept by the one process that
    serves the health port (the supervisor with `--workers`)."""

    up: bool = False
    dropped: int = 0
    seconds: float = 0.0
    errors: dict[str, int] | None = None

    def __post_init__(self) -> None:
        if self.errors is None:
            self.errors = dict.fromkeys(REASONS, 0)

    def families(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("meshlet_app_metrics_up",
                                "1 if the app's own metrics (--app-metrics) are in this page, else 0.", int(self.up))
        errors = CounterMetricFamily("meshlet_app_metrics_scrape_errors",
                                     "Scrapes of the app's metrics that failed, by reason "
                                     "(connect, timeout, status, too_large, invalid).", labels=("reason",))
        for reason, count in (self.errors or {}).items():
            errors.add_metric((reason,), count)
        yield errors
        yield GaugeMetricFamily("meshlet_app_metrics_dropped_families",
                                "The app's metric families left out of this page: their names are the sidecar's "
                                "or the mesh's (meshlet_*, istio_*).", self.dropped)
        yield GaugeMetricFamily("meshlet_app_metrics_scrape_duration_seconds",
                                "How long fetching the app's metrics took for this page.", self.seconds)
