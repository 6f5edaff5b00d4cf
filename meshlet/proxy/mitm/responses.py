"""The responses the sidecar makes itself: short, plain-text, and saying what to do."""

from __future__ import annotations

from mitmproxy import http


def make(status: int, message: str) -> http.Response:
    return http.Response.make(
        status, (message + "\n").encode(), {"content-type": "text/plain; charset=utf-8", "x-meshlet": "local"}
    )


def no_route(host: str) -> http.Response:
    return make(404, f"meshlet: no route for host {host!r} in the current policy")


def no_policy(host: str) -> http.Response:
    return make(404, f"meshlet: no policy governs host {host!r} (--strict-hosts)")


def unavailable(backend: str, detail: str) -> http.Response:
    return make(503, f"meshlet: backend {backend!r} unavailable: {detail}")


def bad_gateway(backend: str, detail: str) -> http.Response:
    return make(502, f"meshlet: backend {backend!r} failed: {detail}")


def timed_out(route: str, seconds: float) -> http.Response:
    return make(504, f"meshlet: route {route!r} timed out after {seconds:g}s")
