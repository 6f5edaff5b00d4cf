"""The chart's Grafana dashboard as the tests read it: panels by row, their PromQL, and the
template variables resolved and substituted the way Grafana does before it sends a query.

Grafana resolves a query variable `label_values(SELECTOR, LABEL)` with the label-values API
(match[] = SELECTOR), formats a multi-value selection for a regex matcher as `(a|b)`, and
replaces `$__rate_interval` by max(4 × scrape interval, step + scrape interval).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from prometheus_support import SCRAPE_INTERVAL, Prometheus

REPO = Path(__file__).parents[3]
DASHBOARD = REPO / "helm" / "meshlet" / "dashboards" / "meshlet.json"
STEP = 1.0  # seconds between points of a range query, as a panel a few minutes wide asks
BUILTINS = {"__rate_interval": f"{max(4 * SCRAPE_INTERVAL, STEP + SCRAPE_INTERVAL):g}s", "__interval": f"{STEP:g}s"}
_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
_LABEL_VALUES = re.compile(r"label_values\((?:(.*),\s*)?(\w+)\)", re.DOTALL)


@dataclass(frozen=True)
class Target:
    row: str
    panel: str
    ref: str
    expr: str

    def __str__(self) -> str:
        return f"{self.row} / {self.panel} / {self.ref}"


def load(text: str | None = None) -> dict:
    return json.loads(DASHBOARD.read_text() if text is None else text)


def panels(dashboard: dict) -> Iterator[tuple[str, dict]]:
    """(row title, panel) for every panel that is not a row, collapsed rows included."""
    row = ""
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            row = panel["title"]
            yield from ((row, p) for p in panel.get("panels", []))
        else:
            yield row, panel


def targets(dashboard: dict) -> list[Target]:
    return [Target(row, p["title"], t["refId"], t.get("expr", "")) for row, p in panels(dashboard) for t in p["targets"]]


def used_variables(text: str) -> set[str]:
    return {a or b for a, b in _VARIABLE.findall(text)}


def query_variables(dashboard: dict) -> dict[str, str]:
    """name → `label_values(...)` of every query variable, in the order Grafana resolves them."""
    return {v["name"]: v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"}


def substitute(text: str, values: Mapping[str, list[str]]) -> str:
    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name in BUILTINS:
            return BUILTINS[name]
        chosen = [re.escape(v) for v in values[name]]
        return chosen[0] if len(chosen) == 1 else "(" + "|".join(chosen) + ")" if chosen else ""

    return _VARIABLE.sub(one, text)


def resolve(prometheus: Prometheus, dashboard: dict) -> dict[str, list[str]]:
    """Every query variable's values (all selected), each query seeing the variables before it."""
    values: dict[str, list[str]] = {}
    for name, query in query_variables(dashboard).items():
        match = _LABEL_VALUES.fullmatch(substitute(query, values))
        assert match, f"variable {name}: not label_values(...): {query}"
        selector, label = match.groups()
        params = {"match[]": [selector]} if selector else {}
        values[name] = prometheus.api(f"label/{label}/values", params)
    return values


def run(prometheus: Prometheus, dashboard: dict, start: float, end: float) -> dict[Target, list[dict]]:
    """Each target's range query over [start, end] as Grafana sends it; a PromQL error raises,
    naming the panel."""
    values = resolve(prometheus, dashboard)
    results = {}
    for target in targets(dashboard):
        query = substitute(target.expr, values)
        try:
            results[target] = prometheus.api("query_range", {"query": query, "start": f"{start:.3f}",
                                                             "end": f"{end:.3f}", "step": f"{STEP:g}"})["result"]
        except Exception as e:
            raise AssertionError(f"{target}: {e}\n{query}") from e
    return results
