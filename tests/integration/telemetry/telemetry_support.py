"""Helpers for the telemetry tests: metric reads with label filters, an app that shows what peer
metadata reached it (and forges its own), and a backend that switches protocols and echoes bytes.

Built on the sidecar and mTLS tests' helpers (real `meshlet run` processes, real sockets).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator

from mesh_support import FRONTEND, REVIEWS
from prometheus_client.parser import text_string_to_metric_families
from sidecar_support import Backends, Sidecar, admin, run_sidecar

from meshlet.proxy import httpserver
from meshlet.proxy.httpserver import Reply, Request

METADATA = "x-meshlet-peer-metadata"
FORGED = "workload=evil;namespace=default;app=evil;version=forged;service=evil"
FRONTEND_SIDE = {"workload": "frontend", "workload_namespace": "default", "principal": FRONTEND,
                 "app": "frontend", "version": "v1"}
REVIEWS_SIDE = {"workload": "reviews", "workload_namespace": "default", "principal": REVIEWS,
                "app": "reviews", "version": "v2"}


def samples(sidecar: Sidecar, name: str, **labels: str) -> list:
    """The samples of `name` whose labels include `labels`."""
    status, text = admin(sidecar, "GET", "/metrics")
    assert status == 200, text
    assert isinstance(text, str)
    return [s for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


def total(sidecar: Sidecar, name: str, **labels: str) -> float:
    return sum(s.value for s in samples(sidecar, name, **labels))


def wait_total(sidecar: Sidecar, name: str, expected: float, seconds: float = 5.0, **labels: str) -> float:
    """`total` once it reaches `expected` (a connection's close is counted a moment after the client saw it)."""
    deadline = time.monotonic() + seconds
    while (value := total(sidecar, name, **labels)) < expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


async def _metadata_app(request: Request) -> Reply:
    """Answers with the peer metadata it was given (`-`: none), and forges some of its own."""
    return Reply(200, f"{request.headers.get(METADATA, '-')}\n".encode(), headers={METADATA: FORGED})


def start_metadata_app(servers: Backends) -> int:
    return servers.serve("metadata-app", httpserver.start(_metadata_app, "127.0.0.1", 0))


async def _upgrade_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers any request head with 101, then echoes every byte until the client closes."""
    try:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


def start_upgrade_echo(servers: Backends) -> int:
    return servers.serve("upgrade-echo", asyncio.start_server(_upgrade_echo, "127.0.0.1", 0))


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A plain TCP echo server (what a CONNECT tunnel reaches)."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


def start_echo(servers: Backends) -> int:
    return servers.serve("echo", asyncio.start_server(_echo, "127.0.0.1", 0))


# --- a mesh hop: frontend's sidecar (A) calls reviews' sidecar (B) over mTLS -----------------------
def side(prefix: str, values: dict[str, str]) -> dict[str, str]:
    """Istio's labels of one side: `source_workload`, ..."""
    return {f"{prefix}_{name}": value for name, value in values.items()}


def inbound_policy(mode: str = "STRICT") -> str:
    """B's own policy: `mode`, frontend allowed."""
    return (
        "apiVersion: meshlet.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: self}\nspec:\n  host: self\n"
        '  backends:\n    b: {address: "127.0.0.1:9"}\n  routes:\n    - name: all\n      to: [{backend: b}]\n'
        f"  mtls: {{mode: {mode}, allow: ['{FRONTEND}']}}\n"
    )


def mesh_route(b: Sidecar, host: str = "reviews") -> str:
    """A's policy: `host` goes to B's inbound over mesh mTLS, B proving reviews' identity."""
    return (
        f"apiVersion: meshlet.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: {host}}}\nspec:\n"
        f'  host: {host}\n  backends:\n    b: {{address: "127.0.0.1:{b.inbound[1]}", tls: mesh, '
        f'identity: "{REVIEWS}"}}\n  routes:\n    - name: all\n      to: [{{backend: b}}]\n'
    )


def workload_flags(root, name: str, version: str) -> tuple[str, ...]:
    """`meshlet run` flags naming this workload (namespace default) as injection passes them."""
    labels = root / f"{name}.labels"
    labels.write_text(f'app="{name}"\nversion="{version}"\n')
    return ("--metrics-compat", "istio", "--workload", name, "--workload-namespace", "default",
            "--workload-labels", str(labels))


@contextlib.contextmanager
def mesh_pair(root, app_port: int) -> Iterator[tuple[Sidecar, Sidecar]]:
    """B (reviews, STRICT, allows frontend, its app at `app_port`), then A (frontend) routing
    `reviews` to B over mesh mTLS: identity dirs `a` and `b` under `root` (the `identities` fixture)."""
    b_flags = workload_flags(root, "reviews", "v2")
    with run_sidecar(inbound_policy(), "--identity", str(root / "b"), *b_flags, app_port=app_port) as b:
        a_flags = workload_flags(root, "frontend", "v1")
        with run_sidecar(mesh_route(b), "--identity", str(root / "a"), *a_flags) as a:
            yield a, b
            assert "Traceback" not in a.stderr() + b.stderr()
