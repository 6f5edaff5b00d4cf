"""Merging the app's page into the sidecar's: what is kept, what wins a shared name, what is refused.

Every merged page is also read by Prometheus' own parser (`promtool check metrics`, from
Debian's prometheus package): a page it cannot parse would cost the sidecar's series too.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from meshlet.telemetry.merge import InvalidPage, ScrapeStats, merge, page_names, parse, render

PROMTOOL = shutil.which("promtool")

# What Bookinfo's productpage serves (prometheus_client defaults and its own counter), as `text/html`.
APP_TEXT = b"""# HELP python_info Python platform information
# TYPE python_info gauge
python_info{implementation="CPython",major="3",minor="11",patchlevel="7",version="3.11.7"} 1.0
# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total 0.44
# HELP request_result_total Results of requests
# TYPE request_result_total counter
request_result_total{destination_app="details",response_code="500"} 3.0
request_result_total{destination_app="reviews",response_code="200"} 7.0
# HELP request_result_created Results of requests
# TYPE request_result_created gauge
request_result_created{destination_app="details",response_code="500"} 1.7961572480087104e+09
"""

APP_OPENMETRICS = b"""# TYPE jobs counter
# HELP jobs Jobs done.
jobs_total{queue="a b \\"c\\""} 5.0
jobs_created{queue="a b \\"c\\""} 1.7e+09
# TYPE build info
build_info{version="1.2"} 1.0
# TYPE latency_seconds histogram
# UNIT latency_seconds seconds
latency_seconds_bucket{le="0.1"} 1.0
latency_seconds_bucket{le="+Inf"} 2.0
latency_seconds_count 2.0
latency_seconds_sum 0.3
# EOF
"""


def sidecar_page(*extra: str) -> bytes:
    registry = CollectorRegistry()
    Counter("meshlet_requests", "Requests.", ("code",), registry=registry).labels("200").inc()
    Histogram("meshlet_request_duration_seconds", "Durations.", registry=registry).observe(0.1)
    for name in extra:
        Gauge(name, "the sidecar's own", registry=registry).set(1)
    return generate_latest(registry)


def merged_page(sidecar: bytes, app: bytes, content_type: str = "text/plain; version=0.0.4") -> bytes:
    result = merge(page_names(sidecar), parse(app, content_type))
    return sidecar + render(ScrapeStats(up=True, dropped=len(result.dropped)).families()) + render(result.families)


def samples(page: bytes) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(page.decode()) for s in family.samples}


def type_lines(page: bytes) -> list[str]:
    return [line.split()[2] for line in page.decode().splitlines() if line.startswith("# TYPE ")]


def promtool_parses(page: bytes) -> None:
    """Prometheus' own parser: exit 1 is a parse error; 3 only lint advice (e.g. a missing unit suffix)."""
    if PROMTOOL is None:
        pytest.skip("needs promtool (Debian's prometheus package; scripts/setup installs it)")
    result = subprocess.run([PROMTOOL, "check", "metrics"], input=page, capture_output=True, timeout=30)
    assert result.returncode in (0, 3), result.stdout.decode() + result.stderr.decode()


class TestMerge:
    def test_the_apps_series_come_through_with_their_labels(self):
        page = merged_page(sidecar_page(), APP_TEXT, "text/html; charset=utf-8")  # productpage's content type
        got = samples(page)
        assert got[("request_result_total", (("destination_app", "details"), ("response_code", "500")))] == 3.0
        assert got[("request_result_total", (("destination_app", "reviews"), ("response_code", "200")))] == 7.0
        assert got[("process_cpu_seconds_total", ())] == 0.44
        assert got[("meshlet_requests_total", (("code", "200"),))] == 1.0
        assert got[("meshlet_app_metrics_up", ())] == 1.0
        assert len(type_lines(page)) == len(set(type_lines(page)))
        promtool_parses(page)

    def test_openmetrics_is_written_back_as_text(self):
        page = merged_page(sidecar_page(), APP_OPENMETRICS, "application/openmetrics-text; version=1.0.0")
        got = samples(page)
        assert got[("jobs_total", (("queue", 'a b "c"'),))] == 5.0
        assert got[("build_info", (("version", "1.2"),))] == 1.0
        assert got[("latency_seconds_bucket", (("le", "+Inf"),))] == 2.0
        assert b"# EOF" not in page
        assert {"jobs_total", "jobs_created", "build_info", "latency_seconds"} <= set(type_lines(page))
        promtool_parses(page)

    def test_on_a_shared_name_the_sidecar_wins_and_says_so(self):
        sidecar = sidecar_page("process_cpu_seconds_total")  # as if the sidecar exported process metrics
        result = merge(page_names(sidecar), parse(APP_TEXT, "text/plain"))
        assert result.dropped == ["process_cpu_seconds_total"]
        page = merged_page(sidecar, APP_TEXT)
        assert type_lines(page).count("process_cpu_seconds_total") == 1
        assert samples(page)[("process_cpu_seconds_total", ())] == 1.0  # the sidecar's value
        assert samples(page)[("meshlet_app_metrics_dropped_families", ())] == 1.0
        promtool_parses(page)

    def test_the_mesh_names_are_never_the_apps(self):
        """An app cannot forge what rollouts and Flagger judge it by, even before the sidecar counted anything."""
        forged = (b"# TYPE meshlet_upstream_requests_total counter\nmeshlet_upstream_requests_total"
                  b'{backend="canary",code="200"} 1e9\n# TYPE istio_requests_total counter\nistio_requests_total 1e9\n'
                  b"# TYPE mine gauge\nmine 1\n")
        result = merge(page_names(sidecar_page()), parse(forged, "text/plain"))
        assert result.dropped == ["meshlet_upstream_requests_total", "istio_requests_total"]
        assert [f.name for f in result.families] == ["mine"]

    def test_a_sample_name_counts_as_taken(self):
        """The app's gauge `meshlet_request_duration_seconds_count` would repeat a sample of the sidecar's histogram."""
        sidecar = sidecar_page()
        assert "meshlet_request_duration_seconds_count" in page_names(sidecar)
        clash = b"# TYPE x_count gauge\nx_count 1\n"
        assert merge({"x", "x_count"}, parse(clash, "text/plain")).dropped == ["x_count"]

    @pytest.mark.parametrize(("body", "content_type"), [
        (b"<html><body>Internal Server Error</body></html>", "text/html"),
        (b"\xff\xfe metrics", "text/plain"),
        (b'ok{bad-label="1"} 1\n', "text/plain"),
        (b"# TYPE a gauge\na 1\n", "application/openmetrics-text; version=1.0.0"),  # no # EOF
        (b"# TYPE a gauge\na 1\n# TYPE a counter\na_total 2\n", "text/plain"),
        (b"x 1\n# TYPE x gauge\n", "text/plain"),  # TYPE after samples
    ])
    def test_garbage_is_refused_whole(self, body, content_type):
        with pytest.raises(InvalidPage):
            merge(set(), parse(body, content_type))

    def test_an_untyped_family_split_in_two_is_joined(self):
        page = b'a{x="1"} 1\nb 2\na{x="2"} 3\n'
        result = merge(set(), parse(page, "text/plain"))
        rendered = render(result.families)
        assert type_lines(rendered) == ["a", "b"]
        assert samples(rendered)[("a", (("x", "2"),))] == 3.0
        promtool_parses(rendered)


def test_scrape_stats_say_why_the_app_is_missing():
    stats = ScrapeStats()
    assert stats.errors is not None
    stats.errors["timeout"] += 2
    got = samples(render(stats.families()))
    assert got[("meshlet_app_metrics_up", ())] == 0.0
    assert got[("meshlet_app_metrics_scrape_errors_total", (("reason", "timeout"),))] == 2.0
    assert got[("meshlet_app_metrics_scrape_errors_total", (("reason", "connect"),))] == 0.0
